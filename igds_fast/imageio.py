"""Image output: [-1, 1] tensors to uint8, atomic deterministic PNG / JSON writes, composites, previews.

Conventions: model-space images are float tensors in [-1, 1], layout [C, H, W] or [N, C, H, W];
file-space images are uint8 numpy arrays [H, W, C] (C = 1 or 3).

Atomic writes: the bytes are produced in memory first, written to a temporary file in the target's
own folder (same file system, so the rename is atomic), flushed and fsync'ed, then moved over the
final name with ``os.replace``. A crash or error at any point leaves either the old file or no file
under the final name, never a half-written one, and the temporary file is removed on error. A full
disk (ENOSPC, or an exhausted quota) is raised as a one-line `IGDSDiskFullError` naming the folder.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from igds_fast.errors import IGDSDiskFullError, IGDSInputError
from igds_fast.overlap import refuse_root_or_home

# What a full disk (or an exhausted quota) raises: reported in one line naming the folder.
DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))

# Fixed zlib level: PNG bytes depend only on pixels and this level (Pillow writes no timestamp).
PNG_COMPRESS_LEVEL = 6


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Map [-1, 1] images to uint8 [H, W, C] (or [N, H, W, C] for a batch) as ``((x+1)*127.5).round()``.

    Exactly ``((x + 1) * 127.5).round().clamp(0, 255)`` computed in float32, then cast. So -1 -> 0,
    1 -> 255, 0 -> 128, and values outside [-1, 1] saturate. ``torch.round`` breaks exact .5 ties
    to even (127.5 -> 128, 0.5 -> 0); this differs from guided-diffusion's truncating
    ``.to(uint8)`` by design (rounding is unbiased) and is identical on every device. Non-finite
    values raise IGDSInputError (they mean a diverged sampler, never a picture). uint8 input is
    taken as already converted and only transposed to HWC.
    """
    tensor = torch.as_tensor(images)
    if tensor.dtype == torch.uint8:
        if tensor.dim() not in (3, 4) or tensor.shape[-3] not in (1, 3):
            raise IGDSInputError(f"to_uint8 expects [C,H,W] or [N,C,H,W] images, got shape {tuple(tensor.shape)}")
        return tensor.detach().cpu().movedim(-3, -1).contiguous().numpy()
    if tensor.dim() not in (3, 4):
        raise IGDSInputError(f"to_uint8 expects [C,H,W] or [N,C,H,W] images, got shape {tuple(tensor.shape)}")
    if tensor.shape[-3] not in (1, 3):
        raise IGDSInputError(f"to_uint8 expects 1 or 3 channels, got {tensor.shape[-3]}")
    tensor = tensor.detach().to("cpu", torch.float32)
    if not torch.isfinite(tensor).all():
        raise IGDSInputError("images contain NaN or infinite values")
    scaled = ((tensor + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return scaled.movedim(-3, -1).contiguous().numpy()


def _as_hwc_uint8(image) -> np.ndarray:
    """A PNG-ready uint8 [H, W, C] array.

    Torch tensors are [C, H, W] (float in [-1, 1], or uint8); numpy arrays are uint8 [H, W, C] or
    [H, W] (the file-space layout).
    """
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise IGDSInputError(f"expected one [C,H,W] image tensor, got shape {tuple(image.shape)}")
        return to_uint8(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise IGDSInputError(
            f"expected a uint8 HWC array or a float [-1,1] CHW tensor, got array of {array.dtype}"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise IGDSInputError(f"expected an [H,W,1] or [H,W,3] image, got shape {array.shape}")
    return array


def encode_png(image) -> bytes:
    """Deterministic PNG bytes (grayscale for 1 channel, RGB for 3; no metadata, fixed compression)."""
    array = _as_hwc_uint8(image)
    if array.shape[2] == 1:
        pil_image = Image.fromarray(np.ascontiguousarray(array[:, :, 0]), mode="L")
    else:
        pil_image = Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    buffer = io.BytesIO()
    pil_image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def file_mode() -> int:
    """The mode of a new output file: 0666 less the process's umask, as open() would give it."""
    return 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _writable_folder(folder: str, flag: str, path: str) -> None:
    """Refuse a folder this process cannot create files in (read-only file system, no permission)."""
    if not os.access(folder, os.W_OK | os.X_OK):  # access(2) reports EROFS for a read-only file system
        raise IGDSInputError(f"{flag} {path}: cannot write in {folder} (read-only file system or no permission)")


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> None:
    """The checks a command makes on a file it will write, before any work: one line each.

    Refused: an existing folder, a symbolic link that leads nowhere, a missing parent folder, a parent
    this process cannot write in. (The write itself is atomic: write_bytes_atomic.)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IGDSInputError(f"{flag} {path} is a folder; give the path of a file to write")
    if os.path.islink(path) and not os.path.exists(path):
        raise IGDSInputError(f"{flag} {path} is a symbolic link to {os.readlink(path)!r}, which does not exist")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise IGDSInputError(f"{flag} {path}: output folder {folder!r} does not exist")
    _writable_folder(folder, flag, path)


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> None:
    """The same for an output folder a command creates or fills: a file, a dangling link, a folder (or,
    when it does not exist yet, its nearest existing parent) it cannot write in."""
    path = os.fspath(path)
    refuse_root_or_home(flag, path)  # a folder of its own: never / or the user's home (overlap.py)
    if os.path.islink(path) and not os.path.exists(path):
        raise IGDSInputError(f"{flag} {path} is a symbolic link to {os.readlink(path)!r}, which does not exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise IGDSInputError(f"{flag} {path} exists and is not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise IGDSInputError(f"{flag} {path}: {existing} is a file, not a folder")
    _writable_folder(existing, flag, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """A binary handle whose bytes appear at ``path`` atomically when the block ends without an error:
    a hidden temporary file in the same folder (mode from the umask), fsync, os.replace, the folder
    fsynced. On any error (or a kill) the temporary file is removed or left hidden and ``path`` keeps
    its previous content; a full disk or quota is IGDSDiskFullError naming the folder. The parent
    folder must exist.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise IGDSInputError(f"output folder {folder!r} does not exist")
    # Hidden, uniquely named temp file: concurrent writers never collide and globbing for
    # "*.png" never picks up a partial file.
    try:
        fd, temp_path = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise IGDSDiskFullError(folder) from exc
        raise
    try:
        # mkstemp creates 0600; outputs are ordinary files, readable as the user's umask allows.
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException as exc:
        try:
            os.unlink(temp_path)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise IGDSDiskFullError(folder) from exc
        raise
    _fsync_folder(folder)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (`atomic_file`): the previous content of ``path`` (if any)
    is untouched on any error."""
    with atomic_file(path) as handle:
        handle.write(data)


def _fsync_folder(folder: str) -> None:
    """Persist the rename itself (POSIX); best effort where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_png_atomic(path: str | os.PathLike, image) -> None:
    """Save one image as PNG atomically and deterministically (identical pixels -> identical bytes).

    ``image``: a uint8 [H, W, C] / [H, W] numpy array, or a [C, H, W] torch tensor (float in
    [-1, 1], converted with :func:`to_uint8`, or uint8).
    """
    write_bytes_atomic(path, encode_png(image))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as UTF-8 JSON (key order kept, trailing newline) atomically.

    Follows ``json.dumps`` defaults otherwise (NaN is written as ``NaN``); unserialisable objects
    raise TypeError before anything touches the disk.
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def _check_image_batch(images: torch.Tensor, what: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise IGDSInputError(f"{what} expects a [N,C,H,W] tensor, got {shape}")


def _resize_half(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize [N, C, H, W] float images to (height, width) ~ half size.

    Exactly half on both axes (even H and W): 2x2 average pooling (area resampling: every output
    pixel is the mean of the four input pixels it covers; no blur beyond that, no phase shift).
    Otherwise: bilinear with antialiasing (align_corners=False), the closest filter when 2x2
    blocks do not tile the image.
    """
    in_height, in_width = images.shape[-2:]
    if in_height == 2 * height and in_width == 2 * width:
        return F.avg_pool2d(images, kernel_size=2, stride=2)
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def make_composite(images: torch.Tensor) -> torch.Tensor:
    """Merge four same-class images [4, C, H, W] into one [C, H, W] composite (IGDS_SPEC section 5).

    A 2x2 grid filled row-major (image 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right),
    each image resized to half the side, so the composite has the inputs' size. For even H and W
    each quadrant is the 2x2 average pool of its image; for odd sides the top row / left column get
    ceil(H/2) / ceil(W/2) pixels and the others floor, each image bilinearly resized (antialiased)
    to its quadrant. Float images stay float; uint8 images are resized in float32 and rounded back.
    """
    _check_image_batch(images, "make_composite")
    if images.shape[0] != 4:
        raise IGDSInputError(f"make_composite needs exactly 4 images, got {images.shape[0]}")
    height, width = images.shape[-2:]
    if height < 2 or width < 2:
        raise IGDSInputError(f"make_composite needs images of at least 2x2 pixels, got {height}x{width}")
    is_uint8 = images.dtype == torch.uint8
    work = images.float() if is_uint8 or not images.is_floating_point() else images
    top, bottom = height - height // 2, height // 2
    left, right = width - width // 2, width // 2
    quadrant_sizes = [(top, left), (top, right), (bottom, left), (bottom, right)]
    quadrants = [
        _resize_half(work[i : i + 1], qh, qw)[0] for i, (qh, qw) in enumerate(quadrant_sizes)
    ]
    composite = torch.cat(
        [torch.cat(quadrants[0:2], dim=-1), torch.cat(quadrants[2:4], dim=-1)], dim=-2
    )
    if is_uint8:
        composite = composite.round().clamp(0, 255).to(torch.uint8)
    return composite


def make_preview_grid(
    rows: Sequence[Sequence[torch.Tensor] | torch.Tensor],
    max_rows: int = 20,
    padding: int = 2,
    pad_value: float = -1.0,
) -> torch.Tensor:
    """One row of images per class, as one [C, H_total, W_total] image (same dtype as the inputs).

    ``rows[r]`` is a list of [C, H, W] tensors or one [K, C, H, W] tensor; all images share one
    shape. Only the first ``max_rows`` rows are drawn. Rows shorter than the longest are filled
    with ``pad_value`` (-1 = black in [-1, 1] space; use 0 for uint8), which also fills the
    ``padding``-pixel gutters between and around images.
    """
    if max_rows < 1:
        raise IGDSInputError(f"max_rows must be >= 1, got {max_rows}")
    if padding < 0:
        raise IGDSInputError(f"padding must be >= 0, got {padding}")
    stacked_rows = []
    for row_index, row in enumerate(list(rows)[:max_rows]):
        if isinstance(row, torch.Tensor):
            row_tensor = row if row.dim() == 4 else row.unsqueeze(0)
        else:
            if len(row) == 0:
                raise IGDSInputError(f"preview row {row_index} is empty")
            row_tensor = torch.stack([torch.as_tensor(image) for image in row])
        _check_image_batch(row_tensor, "make_preview_grid row")
        if row_tensor.shape[0] == 0:
            raise IGDSInputError(f"preview row {row_index} is empty")
        stacked_rows.append(row_tensor)
    if not stacked_rows:
        raise IGDSInputError("make_preview_grid needs at least one row of images")
    image_shape = stacked_rows[0].shape[1:]
    for row_index, row_tensor in enumerate(stacked_rows):
        if row_tensor.shape[1:] != image_shape:
            raise IGDSInputError(
                f"preview row {row_index} has images of shape {tuple(row_tensor.shape[1:])}, "
                f"expected {tuple(image_shape)}"
            )
    channels, height, width = image_shape
    num_columns = max(row_tensor.shape[0] for row_tensor in stacked_rows)
    num_rows = len(stacked_rows)
    grid = torch.full(
        (channels, padding + num_rows * (height + padding), padding + num_columns * (width + padding)),
        pad_value,
        dtype=stacked_rows[0].dtype,
        device=stacked_rows[0].device,
    )
    for r, row_tensor in enumerate(stacked_rows):
        top = padding + r * (height + padding)
        for c in range(row_tensor.shape[0]):
            left = padding + c * (width + padding)
            grid[:, top : top + height, left : left + width] = row_tensor[c]
    return grid
