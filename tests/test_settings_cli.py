"""Every command's parser is generated from its settings tree (igds_fast/settings.py).

For each command module of `igds_fast.cli.COMMANDS`: its parser takes exactly the flags its tree
(`SETTINGS`) declares, so no flag is declared outside a tree; a tree built from a non-default command
line survives `to_dict` / `from_dict`; the settings objects of calibrate-beta and eval give their
domain functions' keyword arguments in one place; the checks the command lines used to make are the
dataclasses' own.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json

import pytest

from igds_fast import cli
from igds_fast.calibrate import CalibrateRun, CalibrationSettings, calibrate_beta
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.augment import AugmentConfig
from igds_fast.evaluate.protocol import protocol_for
from igds_fast.evaluate.settings import EvalRun, EvalSettings
from igds_fast.evaluate.train import evaluate_distilled
from igds_fast.settings import flags_of, from_args, from_dict, to_dict
from igds_fast.train_ve import VETrainConfig, VETrainRun

# A command line of each command that changes settings at every level of its tree (sections included).
NON_DEFAULT_ARGV = {
    "distill": ["distill", "--prior", "prior.pt", "--arch", "adm64-cond", "--ve", "ve.safetensors", "--ipc", "10",
                "--out", "out", "--scale", "2", "--steps", "20", "--backend", "compiled", "--compile-dtype", "fp32",
                "--select", "s3", "--groups", "3", "--quiet", "--cpu-threads", "2"],
    "demo": ["demo", "digits", "--fast", "--ipc", "1,10", "--beta", "0.3", "--steps", "5", "--quiet", "--out", "x"],
    "train_prior": ["train-prior", "--digits", "--out", "prior.safetensors", "--steps", "10", "--fixed-sigma",
                    "--channels", "1"],
    "train_ve": ["train-ve", "--data", "train", "--val", "val", "--out", "ve.safetensors", "--channels", "1",
                 "--mean", "0.5", "--std", "0.2", "--softplus-beta", "0", "--crop-scale", "0.5,1", "--no-flip",
                 "--keep-bn-stats", "--lambda", "0.1", "--image-size", "20", "--quiet"],
    "calibrate": ["calibrate-beta", "--data", "train", "--val", "val", "--ve", "ve.safetensors", "--out", "beta.json",
                  "--ipc", "10,1", "--betas", "0.1,0", "--no-flip", "--epochs", "3", "--cutmix-prob", "0.5",
                  "--score-normalization", "standardize", "--quiet"],
    "eval": ["eval", "--train", "distilled", "--val", "val", "--protocol", "minimax", "--lr", "0.1", "--no-flip",
             "--cutmix-prob", "0.5", "--schedule", "cosine", "--out", "results.json", "--quiet"],
    "export": ["export-unet", "--prior", "prior.pt", "--batch-size", "4", "--out", "unet.onnx", "--no-check"],
    "export_npz": ["export-npz", "distilled", "--out", "samples.npz", "--force"],
}


def command_module(name: str):
    return importlib.import_module(f"igds_fast.cli.{name}")


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every flag of a parser and its sub-parsers but --help (positional arguments are not flags)."""
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                flags |= parser_flags(subparser)
        else:
            flags.update(action.option_strings)
    return flags


def command_flags(name: str) -> set[str]:
    """The flags of the command parser(s) that the module `name` declares."""
    parser = cli.Parser(prog=cli.PROG)
    command_module(name).add_parser(parser.add_subparsers(dest="command"))
    return parser_flags(parser)


def test_every_command_has_a_settings_tree_and_a_command_line():
    assert set(NON_DEFAULT_ARGV) == set(cli.COMMANDS)
    for name in cli.COMMANDS:
        assert dataclasses.is_dataclass(command_module(name).SETTINGS), name


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_the_parser_takes_exactly_the_flags_of_the_tree(name):
    assert command_flags(name) == set(flags_of(command_module(name).SETTINGS, old=True))


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_a_tree_from_the_command_line_survives_its_dict_form(name):
    tree_class = command_module(name).SETTINGS
    tree = from_args(tree_class, cli.parse(NON_DEFAULT_ARGV[name]))
    data = json.loads(json.dumps(to_dict(tree)))  # JSON-able, as the reports write it
    assert from_dict(tree_class, data) == tree


def test_train_ve_flags_reach_their_fields():
    tree = from_args(VETrainRun, cli.parse(NON_DEFAULT_ARGV["train_ve"]))
    training = tree.training
    assert training.softplus_beta is None and training.in_channels == 1 and training.lambda_cmi == 0.1
    assert training.mean == (0.5,) and training.std == (0.2,) and training.crop_scale == (0.5, 1.0)
    assert not training.horizontal_flip and not training.recompute_bn_stats and not tree.progress
    assert tree.load_size == 20 and tree.checkpoint_path == "ve.safetensors.checkpoint"
    defaults = from_args(VETrainRun, cli.parse(["train-ve", "--data", "d", "--out", "ve.st"]))
    assert defaults.training == VETrainConfig() and defaults.load_size == VETrainConfig().resolution


def test_calibration_settings_are_calibrate_betas_keyword_arguments():
    tree = from_args(CalibrateRun, cli.parse(NON_DEFAULT_ARGV["calibrate"]))
    settings = tree.calibration
    assert settings.ipcs == (1, 10) and settings.betas == (0.0, 0.1)
    keywords = settings.keywords()
    assert set(keywords) <= set(inspect.signature(calibrate_beta).parameters)
    assert keywords["augment"] == AugmentConfig(horizontal_flip=False, cutmix_prob=0.5)
    assert keywords["epochs"] == 3 and keywords["score_normalization"] == "standardize"
    assert CalibrationSettings(ipcs="1", betas="0").keywords()["augment"] == AugmentConfig()


def test_eval_settings_are_evaluate_distilleds_keyword_arguments():
    tree = from_args(EvalRun, cli.parse(NON_DEFAULT_ARGV["eval"]))
    keywords = tree.training.keywords(num_classes=3, channels=3)
    assert set(keywords) <= set(inspect.signature(evaluate_distilled).parameters)
    minimax = protocol_for("minimax", 3)
    assert keywords["protocol"] == minimax and keywords["lr"] == 0.1 and keywords["schedule"] == "cosine"
    # Only what --no-flip / --cutmix-prob change; the protocol's jitter and lighting stay.
    assert keywords["augment"] == dataclasses.replace(minimax.augment, horizontal_flip=False, cutmix_prob=0.5)
    plain = EvalSettings().keywords(num_classes=3, channels=1)
    assert plain["augment"] is None and plain["protocol"] == protocol_for("igds", 3)
    assert all(plain[name] is None for name in ("epochs", "lr", "schedule", "weight_decay", "batch_size"))
    with pytest.raises(IGDSInputError, match="RGB"):
        tree.training.keywords(num_classes=3, channels=1)


@pytest.mark.parametrize("settings, message", [
    (lambda: EvalSettings(seeds=0), "--seeds must be >= 1, got 0"),
    (lambda: EvalSettings(epochs=0), "--epochs must be >= 1, got 0"),
    (lambda: EvalSettings(lr=0.0), "--lr must be > 0, got 0.0"),
    (lambda: EvalSettings(weight_decay=-1.0), "--weight-decay must be >= 0, got -1.0"),
    (lambda: EvalSettings(batch_size=0), "--batch-size must be >= 1, got 0"),
    (lambda: EvalSettings(cutmix_prob=1.5), r"--cutmix-prob must be in \[0, 1\], got 1.5"),
    (lambda: CalibrationSettings(ipcs="1", betas="0", seeds=0), "--seeds must be >= 1, got 0"),
    (lambda: CalibrationSettings(ipcs="1", betas="0", epochs=0), "--epochs must be >= 1, got 0"),
    (lambda: CalibrationSettings(ipcs="1,x", betas="0"), "IPCs must be comma-separated integers"),
    (lambda: CalibrationSettings(ipcs="1", betas=""), "the beta grid is empty"),
])
def test_the_settings_check_themselves_in_one_line(settings, message):
    with pytest.raises(IGDSInputError, match=message) as info:
        settings()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv, message", [
    (["train-ve", "--out", "ve.st"], "igds-fast train-ve: the following arguments are required: --data"),
    (["calibrate-beta", "--data", "d", "--val", "v", "--ve", "ve", "--out", "b.json", "--ipc", "1"],
     "the following arguments are required: --betas"),
    (["eval", "--train", "d", "--val", "v", "--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["calibrate-beta", "--data", "d", "--val", "v", "--ve", "ve", "--out", "b.json", "--ipc", "1", "--betas", "0",
      "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["train-ve", "--data", "d", "--out", "ve.st", "--lamda", "0.1"], "unrecognized argument for train-ve: --lamda"),
])
def test_bad_command_lines_fail_in_one_line_before_any_work(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("igds-fast: error: ") and message in err and err.count("\n") == 1
