"""Which files an evaluation trains on: the --ipc cut of a distilled folder and the random real baseline.

* :func:`first_ipc_files` -- MinimaxDiffusion's ``ImageFolder._subset`` (data.py:138-165): the samples
  in ImageFolder order (class, then file name) and, per class, the first ``ipc`` of them. A class
  folder with fewer than ``ipc`` images is refused in one line (its ``assert ipc <= min_class``).
* :func:`random_real_files` -- the ``--baseline random-real`` subset: ``ipc`` files per class of the
  real training folder, drawn without replacement by a generator seeded with ``seed`` (fixed: 0),
  from each class's files sorted by name, kept in name order. The same folder, IPC and seed give the
  same files on every machine.
"""
from __future__ import annotations

from typing import Sequence

import torch

from igds_fast.data import scan_image_folder
from igds_fast.errors import IGDSInputError

BASELINE_SEED = 0


def first_ipc_files(paths_per_class: Sequence[Sequence[str]], class_names: Sequence[str], ipc: int | None,
                    flag: str = "--train") -> tuple[list[list[str]], dict]:
    """(the kept paths per class, a record of the cut) for ``ipc`` images per class (None: all files)."""
    counts = [len(paths) for paths in paths_per_class]
    if ipc is None:
        return [list(paths) for paths in paths_per_class], {"ipc": None, "rule": "every file", "cut_classes": 0}
    short = [(name, count) for name, count in zip(class_names, counts) if count < ipc]
    if short:
        name, count = short[0]
        raise IGDSInputError(f"--ipc {ipc}: class {name!r} of {flag} has {count} image(s) ({len(short)} class(es) have "
                             f"fewer than {ipc})")
    kept = [list(paths[:ipc]) for paths in paths_per_class]
    return kept, {"ipc": ipc, "rule": "the first IPC files of each class by name (MinimaxDiffusion data.py:138-165)",
                  "cut_classes": sum(count > ipc for count in counts)}


def random_real_files(real_dir: str, class_names: Sequence[str], ipc: int, seed: int = BASELINE_SEED) -> list[list[str]]:
    """``ipc`` random files per class of ``real_dir`` (classes as ``class_names``; other folders ignored)."""
    _, paths_per_class = scan_image_folder(real_dir, class_names, ignore_unlisted=True)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for name, paths in zip(class_names, paths_per_class):
        if len(paths) < ipc:
            raise IGDSInputError(f"--real: class {name!r} has {len(paths)} image(s), fewer than the IPC {ipc}")
        picks = torch.randperm(len(paths), generator=generator)[:ipc].sort().values.tolist()
        chosen.append([paths[i] for i in picks])
    return chosen


def flatten(paths_per_class: Sequence[Sequence[str]]) -> tuple[list[str], list[int]]:
    """(paths, labels) in class order."""
    paths = [path for group in paths_per_class for path in group]
    labels = [label for label, group in enumerate(paths_per_class) for _ in group]
    return paths, labels


__all__ = ["BASELINE_SEED", "first_ipc_files", "flatten", "random_real_files"]
