"""The output folder: its settings file, resume state, clearing, the saved batch size and the preview.

    OUT/<class>/<index:05d>.png    exactly IPC files per class (<class> = wnid or class name)
    OUT/preview.png                one row per class (at most 20 classes, 10 images each)
    OUT/.igds_config.json          the settings that determine the pixels, written first
    OUT/.igds_batch.json           the batch size a gamma != 0 folder was started with
    OUT/.igds_lock                 while a run writes: its PID (igds_fast/locks.py)

What distill wrote, the --force clearing and the resume's image check: owned.py.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import torch

from ..errors import IGDSDiskFullError, IGDSInputError
from ..imageio import (
    DISK_FULL_ERRNOS,
    make_preview_grid,
    save_png_atomic,
    write_json_atomic,
)
from .owned import (BATCH_NAME, CONFIG_NAME, MANIFEST_NAME, NAMED_FILES, PREVIEW_NAME, clear, image_paths, output_check,
                    remove_defective_images, temp_of)

PREVIEW_MAX_CLASSES = 20
PREVIEW_MAX_IMAGES = 10
_IMAGE_NAME = re.compile(r"\d{5}\.png")


def coupled_batch_size(out: str, gamma: float, asked: int | None, composite: int) -> int | None:
    """The batch size a gamma != 0 folder was started with (None: none saved, or gamma = 0).

    With gamma != 0 the diversity term couples the samples of one class within a batch, so the batch
    size decides which images are computed together, hence their pixels: a resume must cut the same
    batches. A different --batch-size is refused (one line); without one, the saved size is used
    (no free-memory probe).
    """
    path = os.path.join(out, BATCH_NAME)
    if not gamma or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            saved = int(json.load(handle)["batch_size"])
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError):
        raise IGDSInputError(f"{path} is unreadable; use --force to clear the folder") from None
    if asked is not None and max(composite, asked - asked % composite) != saved:
        raise IGDSInputError(
            f"{out} was started with batch size {saved} and gamma {gamma:g} couples the images of a "
            f"batch: rerun with --batch-size {saved} (or without --batch-size), or use --force to clear it"
        )
    return saved


def _make_folder(path: str) -> None:
    """os.makedirs(exist_ok=True); a full disk is the one-line IGDSDiskFullError naming the folder."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise IGDSDiskFullError(os.path.dirname(os.path.abspath(path))) from exc
        raise


def prepare_output(out: str, settings: dict, force: bool, log) -> int:
    """Make OUT hold this configuration (rank 0, holding OUT's lock): returns how many of its images are done.

    Refused in one line (owned.output_check): other settings without `force`; with `force`, a folder
    holding anything distill did not write; a non-empty folder without a settings file. With `force`
    and other settings, distill's own files are removed first (by the folder's record, nothing else).
    Then the settings file is written (first, so a crash leaves a folder that knows its settings),
    the class folders made, temp files of killed writers removed, and every existing image checked:
    one that is not a whole PNG is removed, to be made again.
    """
    _make_folder(out)
    contents = output_check(out, settings, force)
    if contents is not None:
        log(f"distill: --force: clearing the {len(contents.ours)} file(s) distill wrote in {out} (other settings)")
        clear(out, contents)
    config_path = os.path.join(out, CONFIG_NAME)
    if not os.path.isfile(config_path):
        write_json_atomic(config_path, settings)
    # Temp files left by a writer killed mid-write (SIGKILL, a dead rank), of distill's own names only:
    # never a finished file. Safe to remove here: no writer of this run has started yet (under
    # torchrun rank 0 prepares the folder while the other ranks wait).
    for name in os.listdir(out):
        if temp_of(name) in NAMED_FILES:
            os.unlink(os.path.join(out, name))
    for key in settings["classes"]:
        folder = os.path.join(out, key)
        _make_folder(folder)
        for name in os.listdir(folder):
            final = temp_of(name)
            if final is not None and _IMAGE_NAME.fullmatch(final):
                os.unlink(os.path.join(folder, name))
    remove_defective_images(out, settings, log)
    return sum(1 for path in image_paths(settings) if os.path.isfile(os.path.join(out, path)))


def _read_png(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if image.mode in ("L", "I", "1") else "RGB"), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def write_preview(out: str, class_keys: list[str], ipc: int) -> str | None:
    """OUT/preview.png from the files on disk: one row per class (<= 20), <= 10 images per row."""
    rows = []
    for key in class_keys[:PREVIEW_MAX_CLASSES]:
        row = []
        for index in range(min(ipc, PREVIEW_MAX_IMAGES)):
            path = os.path.join(out, key, f"{index:05d}.png")
            if os.path.isfile(path):
                row.append(_read_png(path))
        if row:
            rows.append(row)
    if not rows:
        return None
    grid = make_preview_grid(rows, max_rows=PREVIEW_MAX_CLASSES, padding=2, pad_value=0)
    path = os.path.join(out, PREVIEW_NAME)
    save_png_atomic(path, grid)
    return path


__all__ = ["BATCH_NAME", "CONFIG_NAME", "MANIFEST_NAME", "PREVIEW_NAME", "coupled_batch_size", "output_check",
           "prepare_output", "write_preview"]
