"""The ``igds-fast`` command line: argparse and nothing else, one module per command.

A command module `igds_fast/cli/<name>.py` holds ``add_parser(subparsers)``, which declares its
arguments and sets ``handler=run``, and ``run(args) -> int``, which turns the arguments into the
domain module's config and calls it. To add a command, write the module and list it in
``COMMANDS``. The domain modules import nothing from here.

Errors: an IGDSInputError anywhere prints ``igds-fast: error: <message>`` to stderr and exits 2
(argparse's own usage errors exit 2 the same way).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from igds_fast.cpu_math import request_reproducible_cpu_math
from igds_fast.errors import IGDSInputError

PROG = "igds-fast"


# The command modules of igds_fast.cli, in the order `igds-fast --help` lists their commands. Each
# defines add_parser(subparsers), which sets handler=run, and run(args) -> exit code.
COMMANDS = ("distill", "train_prior", "train_ve", "calibrate", "eval", "export", "export_npz")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    from igds_fast import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Fast Information-Guided Diffusion Sampling (IGDS) for dataset distillation."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMANDS:
        # Imported here, not at the top: the domain modules load torch, which must come after
        # main() has set MKL's mode (igds_fast.cpu_math).
        importlib.import_module(f"{__name__}.{module_name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: parse ``argv`` (default sys.argv[1:]), run the subcommand, return its exit code.

    Before anything imports torch (the subcommand parsers import their modules), MKL is put in its
    reproducible mode unless the user set MKL_CBWR: the commands promise byte-identical outputs
    on a CPU (igds_fast.cpu_math).
    """
    request_reproducible_cpu_math()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except IGDSInputError as exc:
        if not getattr(exc, "quiet", False):  # under torchrun only rank 0 reports a bad input
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
