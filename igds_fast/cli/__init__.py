"""The ``igds-fast`` command line: one module per command, each a parser generated from its settings tree.

A command module `igds_fast/cli/<name>.py` holds ``SETTINGS``, the root class of its settings tree
(igds_fast/settings.py: every flag is declared on a field of that tree), ``add_parser(subparsers)``,
which generates its arguments from ``SETTINGS`` and sets ``handler=run``, and ``run(args) -> int``,
which builds the tree from the arguments and runs the domain code with it. To add a command, write
the module and list it in ``COMMANDS``. The domain modules import nothing from here.

Errors, in this one place (`main`): an IGDSInputError anywhere prints ``igds-fast: error: <message>``
to stderr and exits 2 (argparse's own usage errors exit 2 the same way). So does an OSError, which
a user or a file causes, never the code (a read-only or full file system, a name too long, a link
loop, a missing file, a folder where a file should be, an image PIL cannot open): one line naming the
path (`describe_os_error`). Ctrl-C (KeyboardInterrupt) prints one line saying what is kept (the
command's `interrupted` default; distill: the folder is resumable) and exits 130, as a shell's
128 + SIGINT.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import Sequence

from igds_fast.cpu_math import request_reproducible_cpu_math
from igds_fast.errors import IGDSInputError

PROG = "igds-fast"


# The command modules of igds_fast.cli, in the order `igds-fast --help` lists their commands. Each
# defines SETTINGS (its tree's root class), add_parser(subparsers), which sets handler=run, and run(args).
COMMANDS = ("distill", "demo", "train_prior", "train_ve", "calibrate", "eval", "export", "export_npz")
# `igds-fast distill` without any of these runs the digits demo (`igds-fast demo digits`).
MODEL_FLAGS = ("--prior", "--diffusers", "--ve")


def route(argv: list[str]) -> list[str]:
    """The argv to parse: `igds-fast distill` without models is `igds-fast demo digits` with the same flags.

    So the README's first command (`igds-fast distill`) runs the demo, and argparse then refuses any
    flag the demo does not take. `--preset digits` (the demo's old spelling) is routed the same way.
    """
    if not argv or argv[0] != "distill" or any(arg in ("-h", "--help") for arg in argv[1:]):
        return argv
    rest = list(argv[1:])
    names = [arg.split("=", 1)[0] for arg in rest]
    models = any(name in MODEL_FLAGS for name in names)
    for position, arg in enumerate(rest):
        if arg == "--preset=digits" or (arg == "--preset" and rest[position + 1: position + 2] == ["digits"]):
            if models:
                raise IGDSInputError("--preset digits trains its own prior and VE; drop --prior/--diffusers/--ve")
            print(f"{PROG}: note: --preset digits is now spelled `{PROG} demo digits`", file=sys.stderr)
            del rest[position: position + (1 if "=" in arg else 2)]
            return ["demo", "digits", *rest]
    return argv if models else ["demo", "digits", *rest]


def refuse_unknown(command: str, extras: list[str]) -> IGDSInputError:
    """One line for arguments the command does not take, naming the command that does take them."""
    from igds_fast.cli.distill import PEER_FLAGS
    from igds_fast.distill import DistillConfig
    from igds_fast.presets.digits_demo import DigitsDemo
    from igds_fast.settings import flags_of

    flags = list(dict.fromkeys(arg.split("=", 1)[0] for arg in extras if arg.startswith("-")))
    if not flags:
        return IGDSInputError(f"unrecognized arguments: {' '.join(extras)}")
    # A flag of the sampler the user comes from (DiT's --ckpt, ...): name ours. `igds-fast distill`
    # without --prior/--ve was routed to the demo, but the user typed distill: its table applies.
    if command in ("distill", "demo"):
        for flag in flags:
            if flag in PEER_FLAGS:
                owner, ours = PEER_FLAGS[flag]
                return IGDSInputError(f"{flag} is {owner} flag; igds-fast distill takes {ours}")
    verb = "applies" if len(flags) == 1 else "apply"
    distill_flags = set(flags_of(DistillConfig, old=True))
    demo_flags = set(flags_of(DigitsDemo, old=True))
    if command == "demo" and all(flag in distill_flags for flag in flags):
        return IGDSInputError(f"{', '.join(flags)} {verb} to a distillation run (--prior/--ve), not to the digits demo")
    if command == "distill" and all(flag in demo_flags for flag in flags):
        return IGDSInputError(f"{', '.join(flags)} {verb} to the digits demo (igds-fast demo digits, or distill "
                              "without --prior/--ve), not to a distillation run")
    return IGDSInputError(f"unrecognized argument{'s' if len(flags) > 1 else ''} for {command}: {', '.join(flags)}")


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one-line IGDSInputErrors (exit 2 like every bad input)."""

    def error(self, message: str):
        raise IGDSInputError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    from igds_fast import __version__

    parser = Parser(
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


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The namespace of `igds-fast ARGV` (the demo routed, unknown flags refused in one line)."""
    args, extras = build_parser().parse_known_args(route(list(argv)))
    if extras:
        raise refuse_unknown(args.command, extras)
    return args


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
INTERRUPTED_DEFAULT = "nothing partial was kept (every output is written atomically)"
# Said after the strerror of these errnos: what the user can do.
_OS_HINTS = {
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENAMETOOLONG: "shorten the path: a name is longer than the file system allows",
    errno.ELOOP: "a symbolic-link loop",
    errno.ENOSPC: "free space and rerun; nothing partial was kept",
    getattr(errno, "EDQUOT", errno.ENOSPC): "free space and rerun; nothing partial was kept",
}


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: the path(s) it names, its reason and, for some, what to do."""
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    hint = _OS_HINTS.get(exc.errno)
    if hint:
        reason = f"{reason} ({hint})"
    names = [os.fsdecode(name) for name in (exc.filename, exc.filename2) if name is not None]
    return f"{' -> '.join(repr(name) for name in names)}: {reason}" if names else reason


def _raised_by_pil(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc` is Pillow's (its SyntaxError / EOFError mean a broken image)."""
    trace = exc.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return trace is not None and str(trace.tb_frame.f_globals.get("__name__", "")).startswith("PIL.")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: parse ``argv`` (default sys.argv[1:]), run the subcommand, return its exit code.

    Before anything imports torch (the subcommand parsers import their modules), MKL is put in its
    reproducible mode unless the user set MKL_CBWR: the commands promise byte-identical outputs
    on a CPU (igds_fast.cpu_math).
    """
    request_reproducible_cpu_math()
    args = None
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        return int(args.handler(args) or 0)
    except IGDSInputError as exc:
        if not getattr(exc, "quiet", False):  # under torchrun only rank 0 reports a bad input
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal; rank 0 says it
            note = getattr(args, "interrupted", None) or INTERRUPTED_DEFAULT
            print(f"{PROG}: interrupted: {note}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        print(f"{PROG}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError (not imported before MKL's mode)
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        print(f"{PROG}: error: {first.rstrip('.')}; rerun with a smaller --batch-size (distill and train-ve keep "
              "what they wrote and resume)", file=sys.stderr)
        return 2
    except (SyntaxError, EOFError) as exc:
        if not _raised_by_pil(exc):  # a SyntaxError of our own code is a bug: its traceback is wanted
            raise
        print(f"{PROG}: error: an image could not be decoded: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
