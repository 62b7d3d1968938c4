"""igds_fast.settings: flags declared next to their fields, parsers generated, trees built, refused, serialised."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from igds_fast.cli import Parser
from igds_fast.errors import IGDSInputError
from igds_fast.settings import (Flag, add_arguments, flags_of, from_args, from_dict, given_settings, leaf_paths, option,
                                replace, section, to_dict)


@dataclass(frozen=True)
class Engine:
    dtype: str = option("bf16", "--engine-dtype", choices=("bf16", "fp32"), help="the engine's dtype")
    graphs: bool = option(True, "--no-graphs", action="store_false", help="no graph capture")
    batch_size: int | None = option(None, help="API only")

    def __post_init__(self):
        if self.dtype not in ("bf16", "fp32"):
            raise IGDSInputError(f"engine dtype must be bf16 or fp32, got {self.dtype!r}")


@dataclass(frozen=True)
class Backend:
    name: str = option("eager", "--backend", choices=("eager", "compiled"), help="which backend")
    engine: Engine = section(Engine, "engine", when=("name", "compiled", "--backend compiled"),
                             json_flag="--engine-options", json_help="Engine fields as JSON", exclude=("batch_size",))


@dataclass(frozen=True)
class Selection:
    method: str = option("s3", "--select", choices=("s3",), help="the selection")
    groups: int = option(5, "--groups", parse=int, old=("--num-groups",), help="subgroups")


@dataclass(frozen=True)
class Job:
    ipc: int = option(flag="--ipc", parse=int, help="images per class")
    steps: int | str | None = option(None, "--steps", parse=int, default_text="250",
                                     alternates=(Flag("--respacing", help="a respacing string"),), help="steps")
    quiet: bool = option(False, "--quiet", action="store_true", help="say nothing")


@dataclass(frozen=True, kw_only=True)
class Tree:
    folder: str = option(flag="FOLDER", help="a positional argument")
    job: Job = section(Job, "job", required=True)
    backend: Backend = section(Backend, "backend")
    selection: Selection | None = section(Selection, "selection", switch="method")
    seed: int = option(0, "--seed", parse=int, group="job", help="the seed")


def parse(argv):
    parser = Parser(prog="t")
    add_arguments(parser, Tree)
    return parser.parse_args(argv)


def build(argv):
    return from_args(Tree, parse(argv))


def test_defaults_flags_and_sections():
    tree = build(["out", "--ipc", "3"])
    assert tree == Tree(folder="out", job=Job(ipc=3))
    assert tree.backend == Backend() and tree.selection is None and tree.seed == 0
    tree = build(["out", "--ipc", "3", "--seed", "7", "--quiet", "--backend", "compiled", "--engine-dtype", "fp32",
                  "--no-graphs", "--select", "s3", "--groups", "2", "--respacing", "ddim10"])
    assert tree.job == Job(ipc=3, steps="ddim10", quiet=True) and tree.seed == 7
    assert tree.backend == Backend(name="compiled", engine=Engine(dtype="fp32", graphs=False))
    assert tree.selection == Selection(groups=2)


def test_the_parser_lists_each_flag_once_with_its_default_in_the_help():
    parser = Parser(prog="t")
    add_arguments(parser, Tree)
    text = parser.format_help()
    assert "--engine-dtype {bf16,fp32}" in text and "(default: bf16)" in text and "(default: 250)" in text
    assert "--num-groups" not in text  # an old spelling is accepted, not advertised
    assert [title for title in ("job", "backend", "engine", "selection") if f"\n{title}:" in text] == [
        "job", "backend", "engine", "selection"]
    declared = {flag for _, flag in flags_of(Tree)}
    options = {name for action in parser._actions for name in action.option_strings if name != "-h" and name != "--help"}
    assert options == declared | {"--num-groups"}
    assert "FOLDER" in text and "batch_size" not in text.lower().replace("-", "_")


def test_flags_that_do_not_apply_are_refused_naming_them():
    with pytest.raises(IGDSInputError, match=r"^--engine-dtype, --no-graphs apply to --backend compiled only$"):
        build(["o", "--ipc", "1", "--engine-dtype", "fp32", "--no-graphs"])
    with pytest.raises(IGDSInputError, match=r"^--engine-options applies to --backend compiled only$"):
        build(["o", "--ipc", "1", "--engine-options", "{}"])
    with pytest.raises(IGDSInputError, match=r"^--groups applies to --select s3 only$"):
        build(["o", "--ipc", "1", "--groups", "3"])


def test_usage_errors_are_one_line_input_errors():
    for argv, message in ((["o"], "the following arguments are required: --ipc"),
                          (["o", "--ipc", "x"], "argument --ipc: invalid int value"),
                          (["o", "--ipc", "1", "--steps", "2", "--respacing", "3"], "not allowed with argument"),
                          (["o", "--ipc", "1", "--backend", "gpu"], "invalid choice")):
        with pytest.raises(IGDSInputError, match=message) as info:
            parse(argv)
        assert "\n" not in str(info.value)


def test_json_options_under_the_flags_and_unknown_keys_refused():
    tree = build(["o", "--ipc", "1", "--backend", "compiled", "--engine-options", '{"dtype": "fp32", "graphs": false}',
                  "--engine-dtype", "bf16"])
    assert tree.backend.engine == Engine(dtype="bf16", graphs=False)  # the flag wins over the JSON key
    for text, message in (('{"graph": 1}', r"unknown setting\(s\) graph"), ('{"batch_size": 2}', "batch_size"),
                          ("[1]", "must be a JSON object"), ("{nope", "not valid JSON")):
        with pytest.raises(IGDSInputError, match=message):
            build(["o", "--ipc", "1", "--backend", "compiled", "--engine-options", text])
    with pytest.raises(IGDSInputError, match="engine dtype must be bf16 or fp32"):  # the dataclass validates
        build(["o", "--ipc", "1", "--backend", "compiled", "--engine-options", '{"dtype": "int4"}'])


def test_old_spellings_work_with_a_note(capsys):
    assert build(["o", "--ipc", "1", "--select", "s3", "--num-groups", "4"]).selection.groups == 4
    assert capsys.readouterr().err.strip() == "igds-fast: note: --num-groups is now spelled --groups"


def test_a_base_tree_stands_where_no_flag_is_given():
    base = Tree(folder="x", job=Job(ipc=9, steps=4), seed=3, selection=Selection(groups=7))
    tree = from_args(Tree, parse(["o", "--ipc", "2"]), base=base)
    assert tree == Tree(folder="o", job=Job(ipc=2, steps=4), seed=3, selection=Selection(groups=7))
    assert given_settings(Job, parse(["o", "--ipc", "2", "--quiet"]), "job.") == {"ipc": 2, "quiet": True}


def test_dict_round_trip_and_refusals():
    tree = build(["o", "--ipc", "3", "--backend", "compiled", "--select", "s3"])
    data = to_dict(tree)
    assert data["job"] == {"ipc": 3, "steps": None, "quiet": False} and data["selection"]["groups"] == 5
    assert from_dict(Tree, data) == tree
    assert from_dict(Tree, {**data, "selection": None}).selection is None
    with pytest.raises(IGDSInputError, match=r"Tree.job: unknown setting\(s\) ipcs"):
        from_dict(Tree, {**data, "job": {"ipcs": 1}})


def test_replace_by_unique_name_or_path():
    tree = Tree(folder="o", job=Job(ipc=1))
    assert replace(tree, seed=5, steps=3).job.steps == 3
    assert replace(tree, name="compiled", dtype="fp32").backend.engine.dtype == "fp32"
    assert replace(tree, groups=2).selection == Selection(groups=2)  # a switched-off section comes on
    assert replace(tree, backend__engine={"dtype": "fp32"}).backend.engine == Engine(dtype="fp32")
    assert replace(tree, **{"job.ipc": 4}).job.ipc == 4
    with pytest.raises(IGDSInputError, match="has no setting 'nope'"):
        replace(tree, nope=1)
    assert "backend.engine.batch_size" not in list(leaf_paths(Tree))  # excluded: another setting owns it


def test_the_namespace_holds_only_what_was_typed():
    args = parse(["o", "--ipc", "1"])
    assert isinstance(args, argparse.Namespace) and set(vars(args)) == {"folder", "job.ipc"}
