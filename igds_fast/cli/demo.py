"""`igds-fast demo digits`: the whole IGDS pipeline on scikit-learn's digits (igds_fast/presets/digits.py).

`igds-fast distill` without --prior/--diffusers/--ve runs the same command (igds_fast/cli/__init__.py
routes it here), so the README's two set-up commands stay `pip install ... && igds-fast distill`.
Its flags are generated from `DigitsDemo` and `DigitsSettings`; argparse refuses any other.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from igds_fast.distributed import QuietRankError, launched_by_torchrun
from igds_fast.errors import IGDSInputError
from igds_fast.presets.digits import RESULTS_NAME, DigitsSettings, format_table, run_digits
from igds_fast.presets.digits_demo import DigitsDemo, describe_run
from igds_fast.settings import add_arguments, from_args, given_settings

COMMAND = "demo"
SETTINGS = DigitsDemo
DEMOS = ("digits",)


def add_parser(subparsers) -> None:
    """Declare `igds-fast demo digits` (sets handler=run)."""
    parser = subparsers.add_parser(COMMAND, allow_abbrev=False, help="the built-in demos (digits: the whole "
                                   "pipeline on scikit-learn's digits, on a CPU, with no downloads)")
    demos = parser.add_subparsers(dest="demo", metavar="DEMO")
    demos.required = True
    digits = demos.add_parser(
        "digits",
        allow_abbrev=False,
        help="distil scikit-learn's digits with IGDS and evaluate the sets (about 6 minutes on 2 CPU cores)",
        description=(
            "The whole IGDS pipeline on scikit-learn's bundled digits, on the CPU: the shipped prior (or one "
            "trained here), a VE trained here (cached in --work-dir), IPC 1 and 10 distilled unguided, with IGDS "
            "and with IGDS + S³, ConvNet-3 trained on each set and on random real subsets, and a test-accuracy "
            "table. `igds-fast distill` without --prior/--ve runs the same."
        ),
    )
    add_arguments(digits, DigitsDemo)
    digits.set_defaults(handler=run, interrupted="what finished (the prior, the VE, each distilled set) is kept: "
                        "rerun the same command to reuse it")


def _check(demo: DigitsDemo) -> None:
    """Refuse, in one line: torchrun, a --work-dir / --out that is a file."""
    if launched_by_torchrun():
        message = ("the digits demo runs in one process: start it without torchrun (igds-fast demo digits); "
                   "torchrun shards a distillation run (igds-fast distill --prior/--ve)")
        # Only rank 0 reports it: the other ranks exit non-zero without repeating it.
        raise IGDSInputError(message) if os.environ.get("RANK", "0") == "0" else QuietRankError(message)
    for flag, path in (("--work-dir", demo.work_dir), ("--out", demo.out)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise IGDSInputError(f"{flag} {path} exists and is not a folder")


def run(args: argparse.Namespace) -> int:
    """Run the digits demo with the flags given."""
    demo = from_args(DigitsDemo, args)
    overrides = given_settings(DigitsSettings, args, "settings.")
    settings = DigitsSettings.fast(**overrides) if demo.fast else DigitsSettings(**overrides)
    if not settings.device.startswith("cpu"):
        if "threads" in overrides:
            raise IGDSInputError(f"--cpu-threads applies to CPU runs only; this one runs on {settings.device}")
        settings = dataclasses.replace(settings, threads=None)  # the pinned thread count is a CPU choice
    _check(demo)
    out_dir = demo.out or demo.work_dir
    log = (lambda message: None) if not demo.progress else (lambda message: print(message, file=sys.stderr, flush=True))
    log(describe_run(settings, demo.work_dir, out_dir, fast=demo.fast, retrain_prior=demo.retrain_prior))
    # --force clears only after every input is checked (run_digits: device, folders, locks, the demo's records).
    results = run_digits(settings, demo.work_dir, log, out_dir=out_dir, retrain_prior=demo.retrain_prior,
                         force=demo.force)
    print(format_table(results))
    print(f"results written to {os.path.join(out_dir, RESULTS_NAME)}")
    return 0
