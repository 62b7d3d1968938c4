"""A distilled folder as one .npz in guided-diffusion's evaluator format, written image by image.

    arr_0   uint8 [N, H, W, 3]   the images in the manifest's order (grayscale repeated to RGB, as the
                                 evaluator's Inception network reads RGB)
    arr_1   int64 [N]            the prior's class of each image (ImageNet index for ImageNet priors),
                                 or the VE's class where the prior is unconditional

guided-diffusion's `evaluations/evaluator.py` and the sample scripts of its forks read `arr_0` (and
the labels from `arr_1`). The archive is written member by member with the .npy header first, so
memory stays at one image whatever the folder's size (np.savez would hold the whole array); it
appears only by an atomic rename when complete, never inside the folder it reads, over an existing
file only with --force, and only from the folder's own files (a manifest path that leaves the
folder is refused).
"""
from __future__ import annotations

import io
import os
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import IGDSInputError
from .imageio import file_mode
from .limits import read_json
from .overlap import check_apart, inside, resolved
from .settings import option


def _npy_header(dtype, shape) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                   "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()  # write_array_header_1_0 writes the magic string too

MANIFEST_MAX_BYTES = 1 << 30  # ImageNet-1K at IPC 100 is about 40 MB


def _read_rgb(path: str) -> np.ndarray:
    """The image at `path` as uint8 [H, W, 3]; a file PIL cannot decode is one line naming it."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise IGDSInputError(f"{path} is not a readable image ({reason}); rerun distill on the folder to make it "
                             "again") from None


def _check_out(folder: str, out: str, force: bool) -> None:
    """The archive goes outside its input folder, never over a file unless `force`, never over a folder."""
    check_apart([("--out", out)], [("DISTILLED_DIR", folder)])
    if os.path.isdir(out):
        raise IGDSInputError(f"--out {out} is a folder; give the .npz file to write")
    if os.path.lexists(out) and not force:
        raise IGDSInputError(f"--out {out} exists; use --force to replace it")
    out_folder = os.path.dirname(os.path.abspath(out)) or "."
    if not os.path.isdir(out_folder):
        raise IGDSInputError(f"output folder {out_folder!r} does not exist")


def _manifest_images(manifest, manifest_path: str) -> list[dict]:
    """The manifest's image entries, each with a relative "path" inside the folder and an integer label."""
    if not isinstance(manifest, dict):
        raise IGDSInputError(f"{manifest_path} is not a distill manifest (not a JSON object)")
    images = manifest.get("images")
    if not isinstance(images, list) or not images:
        raise IGDSInputError(f"{manifest_path} lists no images")
    for number, entry in enumerate(images):
        where = f"{manifest_path}: image entry {number}"
        if not isinstance(entry, dict):
            raise IGDSInputError(f"{where} is not an object")
        for key in ("path", "label"):
            if key not in entry:
                raise IGDSInputError(f"{where} lacks {key!r}")
        for key in ("label", "prior_label"):
            value = entry.get(key)
            if (value is not None or key == "label") and (isinstance(value, bool) or not isinstance(value, int)):
                raise IGDSInputError(f"{where}: {key} {value!r} is not an integer")
    return images


def _image_path(folder: str, entry: dict, manifest_path: str) -> str:
    """The file of one manifest entry: a relative path that stays inside `folder` (symlinks resolved)."""
    relative = entry["path"]
    if not isinstance(relative, str) or not relative:
        raise IGDSInputError(f"{manifest_path} has an image entry without a path")
    path = os.path.join(folder, relative)
    if (os.path.isabs(relative) or ".." in relative.replace("\\", "/").split("/")
            or not inside(resolved(path), resolved(folder))):
        raise IGDSInputError(f"{manifest_path} names {relative!r}, outside {folder}: export-npz reads only the "
                             "folder's own images")
    return path


def export_npz(folder: str, out: str, force: bool = False) -> dict:
    """Write `folder`'s images (its manifest.json) to `out` (.npz); returns {"images", "shape", "path"}.

    Refused in one line before anything is written: `out` inside `folder` (or the folder itself), an
    existing `out` without `force`, a manifest that is not one (bounded JSON, entries with a path and
    integer labels), and an entry whose path leaves the folder (absolute, `..`, or a symlink out of it).
    """
    if not os.path.isdir(folder):
        raise IGDSInputError(f"{folder} is not a folder: give a finished igds-fast distill folder")
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise IGDSInputError(f"{folder} has no manifest.json: not a finished igds-fast distill folder")
    _check_out(folder, out, force)
    manifest = read_json(manifest_path, "manifest", max_bytes=MANIFEST_MAX_BYTES)
    images = _manifest_images(manifest, manifest_path)
    paths = [_image_path(folder, entry, manifest_path) for entry in images]
    missing = [entry["path"] for entry, path in zip(images, paths) if not os.path.isfile(path)]
    if missing:
        raise IGDSInputError(f"{len(missing)} image(s) of the manifest are missing, e.g. {missing[0]}")
    first = _read_rgb(paths[0])
    shape = (len(images), *first.shape)
    labels = np.array([entry["label"] if entry.get("prior_label") is None else entry["prior_label"]
                       for entry in images], dtype=np.int64)
    out_folder = os.path.dirname(os.path.abspath(out)) or "."
    handle, temporary = tempfile.mkstemp(dir=out_folder, prefix=".", suffix=".npz.tmp")
    os.close(handle)
    try:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                member.write(_npy_header(np.uint8, shape))
                for entry, path in zip(images, paths):
                    pixels = _read_rgb(path)
                    if pixels.shape != first.shape:
                        raise IGDSInputError(f"{entry['path']} is {pixels.shape}, the first image {first.shape}")
                    member.write(np.ascontiguousarray(pixels).tobytes())
            with archive.open("arr_1.npy", "w") as member:
                member.write(_npy_header(np.int64, labels.shape))
                member.write(labels.tobytes())
        os.chmod(temporary, file_mode())  # mkstemp makes 0600; an archive follows the umask like every output
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, out)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return {"images": shape[0], "shape": list(shape), "path": os.path.abspath(out)}


@dataclass(frozen=True, kw_only=True)
class ExportNpzRun:
    """`igds-fast export-npz`: which distilled folder, to which archive."""

    folder: str = option(flag="DISTILLED_DIR", help="a folder written by igds-fast distill")
    out: str = option(flag="--out", metavar="SAMPLES.npz", help="the .npz to write (atomically; never inside "
                      "DISTILLED_DIR)")
    force: bool = option(False, "--force", action="store_true", help="replace an existing --out file")


__all__ = ["ExportNpzRun", "export_npz"]
