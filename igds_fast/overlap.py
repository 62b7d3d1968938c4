"""Where a command may write: never at / or the home folder, never inside, around or over its inputs.

Every command that writes checks its paths here before any expensive work (one-line IGDSInputError):

* an output folder (distill's --out, S³'s --candidates, the demo's --work-dir / --out) is never the
  file system root or the user's home folder: --force there would be asked to clear them;
* no two of a command's folders overlap (the same folder, or one inside the other) when one of them
  is written: distill --select s3's --out / --candidates / --real, the demo's --work-dir / --out,
  eval's --train / --val;
* an output file is never one of the inputs, nor inside an input folder (train-ve, calibrate-beta,
  eval, train-prior, export-npz).

Paths are compared after `os.path.realpath` (symlinks resolved; a path that does not exist yet is
resolved as far as it exists), so a symlink to the real training folder is that folder.
"""
from __future__ import annotations

import os
from typing import Iterable

from .errors import IGDSInputError

Named = tuple[str, str | None]  # (flag, path); a None path is skipped


def resolved(path: str) -> str:
    return os.path.realpath(os.fspath(path))


def inside(path: str, folder: str) -> bool:
    """Whether resolved `path` is `folder` or lies inside it (both resolved)."""
    return os.path.commonpath([path, folder]) == folder


def _shown(flag: str, path: str) -> str:
    real = resolved(path)
    return f"{flag} {path}" if os.path.abspath(path) == real else f"{flag} {path} (= {real})"


def refuse_root_or_home(flag: str, path: str) -> None:
    """Refuse an output folder that is the file system root or the user's home folder."""
    real = resolved(path)
    home = os.path.expanduser("~")
    if real == resolved(os.sep):
        raise IGDSInputError(f"{flag} {path} is the root folder: give a folder of its own")
    if home and home != "~" and real == resolved(home):
        raise IGDSInputError(f"{flag} {path} is your home folder: give a folder of its own")


def check_apart(outputs: Iterable[Named], inputs: Iterable[Named] = ()) -> None:
    """Refuse, naming both flags, an output that overlaps another output or an input.

    outputs / inputs: (flag, path) pairs, files or folders (an output file inside an input folder,
    or equal to an input file, overlaps it). Two inputs may overlap; None paths are skipped.
    """
    outputs = [(flag, path) for flag, path in outputs if path is not None]
    inputs = [(flag, path) for flag, path in inputs if path is not None]
    for position, (flag, path) in enumerate(outputs):
        real = resolved(path)
        for other_flag, other in outputs[position + 1:] + inputs:
            other_real = resolved(other)
            if real == other_real:
                raise IGDSInputError(f"{_shown(flag, path)} and {_shown(other_flag, other)} are the same path: "
                                     f"{flag} must be a place of its own")
            if inside(real, other_real):
                raise IGDSInputError(f"{_shown(flag, path)} lies inside {_shown(other_flag, other)}: "
                                     f"{flag} must be a place of its own, outside {other_flag}")
            if inside(other_real, real):
                raise IGDSInputError(f"{_shown(other_flag, other)} lies inside {_shown(flag, path)}: "
                                     f"{flag} must be a place of its own, around none of the others")


__all__ = ["check_apart", "inside", "refuse_root_or_home", "resolved"]
