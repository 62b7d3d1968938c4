"""The output folder: its settings file, resume state, clearing, the saved batch size and the preview.

    OUT/<class>/<index:05d>.png    exactly IPC files per class (<class> = wnid or class name)
    OUT/preview.png                one row per class (at most 20 classes, 10 images each)
    OUT/.igds_config.json          the settings that determine the pixels, written first
    OUT/.igds_batch.json           the batch size a gamma != 0 folder was started with
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..errors import IGDSDiskFullError, IGDSInputError
from ..imageio import (
    DISK_FULL_ERRNOS,
    make_preview_grid,
    save_png_atomic,
    write_json_atomic,
)

PREVIEW_MAX_CLASSES = 20
PREVIEW_MAX_IMAGES = 10
CONFIG_NAME = ".igds_config.json"
BATCH_NAME = ".igds_batch.json"  # the batch size a gamma != 0 folder was started with (it couples batch members)
MANIFEST_NAME = "manifest.json"
PREVIEW_NAME = "preview.png"


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


def _differing_setting(saved: dict, current: dict) -> str | None:
    """The first setting (by name) whose value differs, described for a one-line error."""
    for key in current:
        if saved.get(key) != current[key]:
            def short(value):
                text = json.dumps(value, sort_keys=True)
                return text if len(text) <= 60 else text[:57] + "..."
            return f"{key} (folder: {short(saved.get(key))}, now: {short(current[key])})"
    for key in saved:
        if key not in current:
            return f"{key} (folder has it, this run does not)"
    return None


def _clear_outputs(out: str, class_keys: list[str]) -> None:
    """Remove what distill writes: class-folder PNGs and temp files, the preview, manifest, config."""
    with os.scandir(out) as entries:
        folders = [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and (
                    entry.name.endswith(".png") or (entry.name.startswith(".") and entry.name.endswith(".tmp"))
                ):
                    os.unlink(entry.path)
        if not os.listdir(folder):
            os.rmdir(folder)
    for name in (MANIFEST_NAME, PREVIEW_NAME, CONFIG_NAME, BATCH_NAME):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.unlink(path)


def _make_folder(path: str) -> None:
    """os.makedirs(exist_ok=True); a full disk is the one-line IGDSDiskFullError naming the folder."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise IGDSDiskFullError(os.path.dirname(os.path.abspath(path))) from exc
        raise


def output_refusal(out: str, settings: dict) -> str | None:
    """Why `out` cannot take a run with these settings (one line), or None; reads only.

    Refused: a folder whose `.igds_config.json` holds other settings, or a non-empty folder that was
    not written by distill. Every rank may call it (nothing is written).
    """
    if not os.path.isdir(out):
        return None
    config_path = os.path.join(out, CONFIG_NAME)
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as handle:
                saved = json.load(handle)
        except (OSError, json.JSONDecodeError):
            saved = {"format": "unreadable"}
        difference = _differing_setting(saved, settings)
        if difference is not None:
            return (f"{out} holds images of another configuration: {difference}; "
                    "use --force to clear it or choose another --out")
        return None
    if any(not name.startswith(".") for name in os.listdir(out)):
        return (f"{out} is not empty and was not written by distill (no {CONFIG_NAME}); "
                "use --force to clear its images or choose another --out")
    return None


def prepare_output(out: str, pixel_settings: dict, class_keys: list[str], force: bool, log) -> int:
    """Make `out` hold this configuration: check or write `.igds_config.json` first, create class folders.

    Returns how many finished PNGs the folder already holds for this configuration.
    Refuses (one line) a folder written with other pixel settings, or a non-empty folder that is
    not a distill output, unless `force` (then its images are cleared).
    """
    _make_folder(out)
    config_path = os.path.join(out, CONFIG_NAME)
    refusal = output_refusal(out, pixel_settings)
    if refusal is not None:
        if not force:
            raise IGDSInputError(refusal)
        log(f"distill: --force: clearing the images of {out} ({refusal.split('; use --force')[0]})")
        _clear_outputs(out, class_keys)
    if not os.path.isfile(config_path):
        write_json_atomic(config_path, pixel_settings)  # first: a crash leaves a folder that knows its settings
    for key in class_keys:
        folder = os.path.join(out, key)
        _make_folder(folder)
        # Temp files left by a writer killed mid-write (SIGKILL, a dead rank): never a finished image.
        # Safe to remove here: no writer of this run has started yet (under torchrun rank 0 prepares
        # the folder while the other ranks wait).
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(folder, name))
    return sum(
        1 for key in class_keys for name in os.listdir(os.path.join(out, key)) if name.endswith(".png")
    )


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


__all__ = ["BATCH_NAME", "CONFIG_NAME", "MANIFEST_NAME", "PREVIEW_NAME", "coupled_batch_size", "prepare_output", "write_preview"]
