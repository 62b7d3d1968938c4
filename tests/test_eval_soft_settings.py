"""The rded / sre2l presets against a table written from the peers' code, and that table against their code.

TABLE_RDED and TABLE_SRE2L are read from LINs-lab/RDED 3f6453d and VILA-Lab/SRe2L 8d00cba (file:line
beside each value). The first tests check igds_fast's presets against the tables (no peer code
needed: they run in CI). The peer tests (skipped without `bash tests/fetch_peers.sh`) check the
tables against the peers' own code, driven as their users drive it: RDED's ``argument.py`` run with
each ``scripts/imagenet-*.sh`` command line (at IPC 1, 10 and 50), SRe2L's ``get_args()`` of
``validate/train_FKD.py`` and the module-level parser of ``relabel/generate_soft_label.py`` with the
command lines of ``train_FKD.sh`` and ``relabel.sh``, and both learning-rate lambdas evaluated as
written in their ``main``.
"""
from __future__ import annotations

import ast
import math
import os
import re
import shlex
import sys
from types import SimpleNamespace

import pytest

from igds_fast.evaluate.soft_protocols import kd_protocol
from peers import peer_root

# RDED: (subset script, classes, student as RDED names it, student in igds_fast, IPC) ->
#   batch (argument.py:233-258), AdamW lr (argument.py:276-306), input size (argument.py:181-211).
# Every script: --factor 2 (crop scale (1/2, 1), main.py:117-123), --re-epochs 300; cutmix (the default
# --mix-type, argument.py:67-73) -> T 20 (argument.py:270-274); AdamW weight decay 0.01 (argument.py:152-154);
# test Resize(size // 7 * 8) + CenterCrop(size) (main.py:154-155).
TABLE_RDED = [
    # subset, classes, RDED student, ours, ipc, batch, lr, size
    ("imagenet-1k", 1000, "resnet18", "torchvision:resnet18", 1, 20, 0.001, 224),
    ("imagenet-1k", 1000, "resnet18", "torchvision:resnet18", 10, 100, 0.001, 224),
    ("imagenet-1k", 1000, "resnet18", "torchvision:resnet18", 50, 200, 0.001, 224),
    ("imagenet-100", 100, "resnet18", "torchvision:resnet18", 1, 20, 0.001, 224),
    ("imagenet-100", 100, "resnet18", "torchvision:resnet18", 10, 100, 0.001, 224),
    ("imagenet-100", 100, "resnet18", "torchvision:resnet18", 50, 200, 0.001, 224),
    ("imagenet-100", 100, "conv6", "convnet6", 1, 20, 0.001, 128),
    ("imagenet-100", 100, "conv6", "convnet6", 10, 100, 0.001, 128),
    ("imagenet-100", 100, "conv6", "convnet6", 50, 200, 0.001, 128),
    ("imagenet-10", 10, "resnet18", "torchvision:resnet18", 1, 10, 0.001, 224),
    ("imagenet-10", 10, "resnet18", "torchvision:resnet18", 10, 50, 0.001, 224),
    ("imagenet-10", 10, "resnet18", "torchvision:resnet18", 50, 100, 0.001, 224),
    ("imagenet-nette", 10, "resnet18", "torchvision:resnet18", 1, 10, 0.001, 224),
    ("imagenet-nette", 10, "resnet18", "torchvision:resnet18", 10, 50, 0.001, 224),
    ("imagenet-nette", 10, "resnet18", "torchvision:resnet18", 50, 100, 0.001, 224),
    ("imagenet-nette", 10, "conv5", "convnet5", 1, 10, 0.001, 128),
    ("imagenet-nette", 10, "conv5", "convnet5", 10, 50, 0.001, 128),
    ("imagenet-nette", 10, "conv5", "convnet5", 50, 100, 0.001, 128),
    ("imagenet-woof", 10, "resnet18", "torchvision:resnet18", 1, 10, 0.001, 224),
    ("imagenet-woof", 10, "resnet18", "torchvision:resnet18", 10, 50, 0.001, 224),
    ("imagenet-woof", 10, "resnet18", "torchvision:resnet18", 50, 100, 0.001, 224),
    ("imagenet-woof", 10, "conv5", "convnet5", 1, 10, 0.001, 128),
    ("imagenet-woof", 10, "conv5", "convnet5", 10, 50, 0.001, 128),
    ("imagenet-woof", 10, "conv5", "convnet5", 50, 100, 0.001, 128),
]
RDED_COMMON = {"epochs": 300, "factor": 2, "temperature": 20.0, "weight_decay": 0.01, "cutmix_alpha": 1.0}
# argument.py:276-306: the other students' AdamW rates (no script uses them; --network torchvision:NAME).
RDED_OTHER_LR = {"mobilenet_v2": 0.0025, "efficientnet_b0": 0.002, "resnet50": 0.001, "resnet101": 0.001,
                 "vgg11": 0.0005, "alexnet": 0.0001, "vit_b_16": 0.0001, "swin_v2_t": 0.0001}

# SRe2L: relabel.sh (generate_soft_label.py) and validate/train_FKD.sh (train_FKD.py).
TABLE_SRE2L = {
    "relabel_arch": "resnet18", "relabel_batch": 1024, "relabel_epochs": 300, "fkd_seed": 42, "input_size": 224,
    "crop_scale": (0.08, 1.0), "use_fp16": True, "mix_type": "cutmix", "cutmix_alpha": 1.0,
    "batch_size": 1024, "accumulation_steps": 2, "temperature": 20.0, "lr": 0.001, "weight_decay": 0.01,
    "epochs": 300, "keep_topk": 1000, "test_resize": 256, "student": "resnet18",
}


def _epochs_sample(epochs: int) -> list[int]:
    return sorted({0, 1, epochs // 3, epochs // 2, epochs - 1, epochs})


# ---- igds_fast's presets against the tables (CI) ------------------------------------------------------------------

@pytest.mark.parametrize("row", TABLE_RDED, ids=lambda r: f"{r[0]}-{r[2]}-ipc{r[4]}")
def test_rded_preset_is_the_table(row):
    _, classes, _, ours, ipc, batch, lr, size = row
    protocol = kd_protocol("rded", ours, ipc, classes)
    assert (protocol.batch_size, protocol.lr, protocol.image_size) == (batch, lr, size)
    assert protocol.test_resize == size // 7 * 8 and protocol.epochs == RDED_COMMON["epochs"]
    assert protocol.patch_factor == RDED_COMMON["factor"] and protocol.crop_scale == (1 / RDED_COMMON["factor"], 1.0)
    assert protocol.temperature == RDED_COMMON["temperature"] and protocol.weight_decay == RDED_COMMON["weight_decay"]
    assert protocol.cutmix_beta == RDED_COMMON["cutmix_alpha"] and protocol.betas == (0.9, 0.999)
    assert protocol.accumulation_steps == 1 and protocol.student_no_grad_forward
    # main.py:95-102: 0.5 (1 + cos(pi e / E / 2)) per epoch; main.py:179-180: tests past 80%, epoch % 10 == 9 or last.
    for epoch in _epochs_sample(protocol.epochs):
        assert math.isclose(protocol.lr_factor(epoch), 0.5 * (1 + math.cos(math.pi * epoch / 300 / 2)))
    tested = [e for e in range(300) if protocol.tests_after(e)]
    assert tested == [249, 259, 269, 279, 289, 299]


def test_rded_learning_rates_of_the_other_students_are_the_table():
    for student, lr in RDED_OTHER_LR.items():
        protocol = kd_protocol("rded", f"torchvision:{student}", 10, 1000)
        assert protocol.lr == lr and "argument.py" in protocol.lr_source, student
    assert kd_protocol("rded", "torchvision:swin_t", 10, 1000).lr_source.startswith("igds_fast:")  # labelled ours


def test_sre2l_preset_is_the_table():
    protocol = kd_protocol("sre2l", "torchvision:resnet18", 10, 1000)
    table = TABLE_SRE2L
    assert (protocol.batch_size, protocol.accumulation_steps, protocol.temperature) == (
        table["batch_size"], table["accumulation_steps"], table["temperature"])
    assert (protocol.lr, protocol.weight_decay, protocol.epochs) == (table["lr"], table["weight_decay"], table["epochs"])
    assert protocol.image_size == table["input_size"] and protocol.test_resize == table["test_resize"]
    assert protocol.crop_scale == table["crop_scale"] and protocol.cutmix_beta == table["cutmix_alpha"]
    assert protocol.patch_factor == 1 and not protocol.student_no_grad_forward
    for epoch in _epochs_sample(protocol.epochs):  # train_FKD.py:161-163
        assert math.isclose(protocol.lr_factor(epoch), 0.5 * (1 + math.cos(math.pi * epoch / 300)))
    assert [e for e in range(300) if protocol.tests_after(e)] == list(range(0, 300, 10)) + [299]  # train_FKD.py:183


# ---- the tables against the peers' own code -------------------------------------------------------------------

def _script_argv(path: str, program: str) -> list[str]:
    """The arguments of the `python <program> ...` command in a shell script (continuations joined)."""
    text = open(path, encoding="utf-8").read().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) >= 2 and words[0] == "python" and os.path.basename(words[1]) == program:
            return words[2:]
    raise AssertionError(f"no `python {program}` command in {path}")


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def _run_rded_arguments(root: str, argv: list[str], cwd, monkeypatch) -> SimpleNamespace:
    """RDED's argument.py as main.py runs it (module-level argparse and settings), in a scratch folder
    (it creates ./exp/<name>)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["main.py", *argv])
    namespace: dict = {"__name__": "argument"}
    source = open(os.path.join(root, "argument.py"), encoding="utf-8").read()
    exec(compile(source, os.path.join(root, "argument.py"), "exec"), namespace)  # noqa: S102 - the peer's own code
    return namespace["args"]


def _first_lambda_in(path: str, call: str) -> ast.Lambda:
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == call:
            for argument in node.args:
                if isinstance(argument, ast.Lambda):
                    return argument
    raise AssertionError(f"no {call}(..., lambda ...) in {path}")


def _evaluate_lambda(node: ast.Lambda, args: SimpleNamespace):
    expression = ast.Expression(body=node)
    ast.fix_missing_locations(expression)
    return eval(compile(expression, "<peer lambda>", "eval"), {"math": math, "args": args})  # noqa: S307


def test_rded_table_is_what_its_argument_py_sets_for_each_script(tmp_path, monkeypatch):
    root = peer_root("rded")
    scripts = sorted(name for name in os.listdir(os.path.join(root, "scripts")) if name.startswith("imagenet-"))
    assert scripts, "RDED's ImageNet scripts are missing"
    covered = set()
    for name in scripts:
        argv = _script_argv(os.path.join(root, "scripts", name), "main.py")
        for ipc in (1, 10, 50):
            args = _run_rded_arguments(root, _with(argv, "--ipc", str(ipc)), tmp_path, monkeypatch)
            rows = [r for r in TABLE_RDED if (r[0], r[2], r[4]) == (args.subset, args.stud_name, ipc)]
            assert len(rows) == 1, (name, args.subset, args.stud_name, ipc)
            _, classes, _, _, _, batch, lr, size = rows[0]
            assert (args.nclass, args.re_batch_size, args.adamw_lr, args.input_size) == (classes, batch, lr, size), name
            assert (args.re_epochs, args.factor, args.temperature) == (
                RDED_COMMON["epochs"], RDED_COMMON["factor"], RDED_COMMON["temperature"]), name
            assert (args.adamw_weight_decay, args.cutmix, args.mix_type) == (
                RDED_COMMON["weight_decay"], RDED_COMMON["cutmix_alpha"], "cutmix"), name
            assert args.arch_name == "resnet18" or args.arch_name == args.stud_name  # the teacher: ResNet-18 or itself
            covered.add(rows[0])
    assert covered == set(TABLE_RDED)  # every row of the table comes from a script
    for student, lr in RDED_OTHER_LR.items():
        args = _run_rded_arguments(root, ["--stud-name", student, "--ipc", "10"], tmp_path, monkeypatch)
        assert args.adamw_lr == lr, student


def test_rded_schedule_and_loss_are_its_main_py():
    root = peer_root("rded")
    path = os.path.join(root, "validation", "main.py")
    schedule = _evaluate_lambda(_first_lambda_in(path, "LambdaLR"), SimpleNamespace(re_epochs=300))
    protocol = kd_protocol("rded", "torchvision:resnet18", 10, 1000)
    for epoch in _epochs_sample(300):
        assert math.isclose(protocol.lr_factor(epoch), schedule(epoch), rel_tol=0, abs_tol=1e-15), epoch
    source = open(path, encoding="utf-8").read()
    for line in ('nn.KLDivLoss(reduction="batchmean")', "F.log_softmax(pred_mix_label / args.temperature, dim=1)",
                 "F.softmax(soft_mix_label / args.temperature, dim=1)", "betas=[0.9, 0.999]",
                 "if epoch % 10 == 9 or epoch == args.re_epochs - 1:", "if epoch > args.re_epochs * 0.8:",
                 "transforms.Resize(args.input_size // 7 * 8, antialias=True)", "scale=(1 / args.factor, args.max_scale_crops)",
                 "mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]", "pred_label = student_model(images)"):
        assert line in source, line  # the facts the module docstring cites


def _sre2l_parser_args(path: str, argv: list[str], monkeypatch, function: str | None):
    """The peer's argparse: ``function`` (get_args) or the module-level `parser` statements, run on ``argv``."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    if function is not None:
        body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function]
        module = ast.Module(body=body, type_ignores=[])
    else:
        body = [node for node in tree.body if "parser" in ast.unparse(node) and not isinstance(node, (ast.FunctionDef,
                                                                                                      ast.If))]
        module = ast.Module(body=body, type_ignores=[])
    namespace: dict = {"argparse": __import__("argparse")}
    exec(compile(module, path, "exec"), namespace)  # noqa: S102 - the peer's own parser
    monkeypatch.setattr(sys, "argv", [os.path.basename(path), *argv])
    return namespace[function]() if function else namespace["parser"].parse_args()


def test_sre2l_table_is_what_its_scripts_and_parsers_set(monkeypatch):
    root = os.path.join(peer_root("sre2l"), "SRe2L")
    table = TABLE_SRE2L
    train = _sre2l_parser_args(os.path.join(root, "validate", "train_FKD.py"),
                               _script_argv(os.path.join(root, "validate", "train_FKD.sh"), "train_FKD.py"),
                               monkeypatch, "get_args")
    assert (train.batch_size, train.gradient_accumulation_steps, train.temperature) == (
        table["batch_size"], table["accumulation_steps"], table["temperature"])
    assert (train.adamw_lr, train.adamw_weight_decay, train.epochs, train.cos, train.sgd) == (
        table["lr"], table["weight_decay"], table["epochs"], True, False)
    assert (train.model, train.mix_type, train.keep_topk, train.fkd_seed) == (
        table["student"], table["mix_type"], table["keep_topk"], table["fkd_seed"])
    relabel = _sre2l_parser_args(os.path.join(root, "relabel", "generate_soft_label.py"),
                                 _script_argv(os.path.join(root, "relabel", "relabel.sh"), "generate_soft_label.py"),
                                 monkeypatch, None)
    assert (relabel.arch, relabel.batch_size, relabel.epochs, relabel.fkd_seed, relabel.input_size) == (
        table["relabel_arch"], table["relabel_batch"], table["relabel_epochs"], table["fkd_seed"], table["input_size"])
    assert (relabel.min_scale_crops, relabel.max_scale_crops) == table["crop_scale"]
    assert (relabel.use_fp16, relabel.mix_type, relabel.cutmix) == (table["use_fp16"], table["mix_type"],
                                                                      table["cutmix_alpha"])
    path = os.path.join(root, "validate", "train_FKD.py")
    schedule = _evaluate_lambda(_first_lambda_in(path, "LambdaLR"), SimpleNamespace(epochs=300))
    protocol = kd_protocol("sre2l", "torchvision:resnet18", 10, 1000)
    for epoch in _epochs_sample(300):
        assert math.isclose(protocol.lr_factor(epoch), schedule(epoch), rel_tol=0, abs_tol=1e-15), epoch
    source = open(path, encoding="utf-8").read()
    for line in ("transforms.Resize(256)", "transforms.CenterCrop(224)", "if epoch % 10 == 0 or epoch == args.epochs - 1:",
                 "# loss = loss * args.temperature * args.temperature", "loss = loss / args.gradient_accumulation_steps"):
        assert line in source, line
    assert re.search(r"KLDivLoss\(reduction=['\"]batchmean['\"]\)", source)
