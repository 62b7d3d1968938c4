"""ImageFolder trees: the scan (structure errors first), the decode (resize + centre crop), the in-memory load.

See the package docstring for the layout and the preprocessing.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import IGDSInputError
from ..limits import HEADER_CAPS, check_class_name, format_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ON_CORRUPT = ("skip", "fail")  # what a loader does with an unreadable image: count and leave it out, or stop
_PIL_MODES = {1: "L", 3: "RGB"}
# What PIL raises for unreadable / truncated / hostile files (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass
class LoadReport:
    """What :func:`load_image_folder` found and loaded."""

    root: str
    class_names: list[str]
    images_per_class: dict[str, int]
    num_loaded: int
    num_skipped_corrupt: int = 0
    skipped_paths: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-serialisable copy."""
        return asdict(self)


def is_image_file(name: str) -> bool:
    """True for a visible file name with a supported image extension (case-insensitive)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_folder(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise IGDSInputError(f"cannot list folder {folder!r}: {exc.strerror or exc}")


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether a visible entry of the root is a class folder; a symbolic-link loop (or any other entry
    that cannot be examined) is one line naming it, since it may be a class that cannot be read."""
    try:
        return entry.is_dir()
    except OSError as exc:
        raise IGDSInputError(f"cannot examine {entry.path!r}: {exc.strerror or exc} (a symbolic-link loop?)") from None


def _is_image_entry(entry: os.DirEntry) -> bool:
    """An image-named entry that is not a folder: files, and also links that lead nowhere (dangling, or a
    loop), listed so that decoding them fails and --on-corrupt skips or names them, never silently."""
    if not is_image_file(entry.name):
        return False
    try:
        return not entry.is_dir()
    except OSError:
        return True


def scan_image_folder(
    root: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    ignore_unlisted: bool = False,
) -> tuple[list[str], list[list[str]]]:
    """List an ImageFolder tree without decoding anything: (class names, image paths per class).

    Classes are sorted folder names, or exactly ``class_names`` in that order when given: every
    listed class must have a folder, and every folder must be listed unless ``ignore_unlisted``
    (e.g. a full ImageNet validation tree evaluated on a 10-class subset). Raises a one-line
    IGDSInputError for a missing root, no class folders, an empty class folder (named), or a
    class-order mismatch.
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise IGDSInputError(f"image folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise IGDSInputError(f"image folder {root!r} is not a directory")
    folders = sorted(e.name for e in _list_folder(root) if not e.name.startswith(".") and _is_dir(e))
    if not folders:
        raise IGDSInputError(f"image folder {root!r} has no class sub-folders (expected root/<class>/<image>)")

    if class_names is None:
        ordered = folders
        for name in ordered:  # the folders' names become the classes (a VE's, a distilled set's)
            check_class_name(name, f"class folder in {root!r}:")
    else:
        ordered = [str(name) for name in class_names]
        if len(set(ordered)) != len(ordered):
            raise IGDSInputError("the given class order lists a class twice")
        listed = set(ordered)
        for folder in folders:
            if folder not in listed and not ignore_unlisted:
                raise IGDSInputError(f"class folder {folder!r} in {root!r} is not in the given class list")
        present = set(folders)
        for name in ordered:
            if name not in present:
                raise IGDSInputError(f"class {name!r} has no folder in {root!r}")

    paths_per_class = []
    for name in ordered:
        folder = os.path.join(root, name)
        files = sorted(e.name for e in _list_folder(folder) if _is_image_entry(e))
        if not files:
            raise IGDSInputError(
                f"class folder {folder!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths_per_class.append([os.path.join(folder, f) for f in files])
    return ordered, paths_per_class


def resize_and_center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """Resize the shorter side to ``image_size`` (bilinear) and crop the centre square."""
    width, height = image.size
    if (width, height) == (image_size, image_size):
        return image
    if width <= height:
        new_width, new_height = image_size, int(image_size * height / width)
    else:
        new_width, new_height = int(image_size * width / height), image_size
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.BILINEAR)
    left = int(round((new_width - image_size) / 2.0))
    top = int(round((new_height - image_size) / 2.0))
    return image.crop((left, top, left + image_size, top + image_size))


# 16-bit and 32-bit integer modes: PIL's convert() clips them to [0, 255] (a full-range 16-bit image
# becomes almost all white), so they are scaled here instead (see to_8bit).
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes convert() maps to L / RGB faithfully (torchvision's ImageFolder loader does the same): alpha is
# dropped (LA, RGBA, PA, P with transparency: each pixel keeps its stored colour), CMYK and YCbCr go
# through PIL's own conversions, 1 becomes 0 / 255.
_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr")


class UnsupportedImageMode(ValueError):
    """An image whose pixel format has no faithful 8-bit reading (treated like an unreadable file)."""


def to_8bit(image: Image.Image) -> Image.Image:
    """An image of an 8-bit mode with the same picture: what :func:`load_image` converts to L / RGB.

    I;16 (16-bit grey, any byte order) and I (32-bit integers, clipped to [0, 65535] first) are scaled
    as round(v * 255 / 65535), so a 16-bit image saved from 8 bits (v = 257 x) reads back exactly and
    a full-range gradient keeps every level within 1. F (32-bit float): values in [0, 1] are scaled
    by 255 (rounded); a float image with values outside [0, 1] (or non-finite) has no known range and
    is refused, as is any mode not listed in _EIGHT_BIT_MODES (LAB, HSV, ...). The 8-bit modes are
    returned unchanged, so their decode is what it always was.
    """
    mode = image.mode
    if mode in _EIGHT_BIT_MODES:
        return image
    if mode in _WIDE_INT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
            low, high = float(np.nanmin(values)), float(np.nanmax(values))
            raise UnsupportedImageMode(f"a floating-point image (mode F) with values in [{low:g}, {high:g}]: only "
                                       "[0, 1] has a known 8-bit reading; save it as 8 or 16 bits")
        return Image.fromarray(np.round(values * 255.0).astype(np.uint8))
    raise UnsupportedImageMode(f"pixel format {mode} is not supported (8-bit L / RGB / RGBA / P / CMYK, or 16-bit "
                               "grey); convert the file to RGB")


def load_image(path: str, image_size: int, channels: int = 3, resize: int | None = None) -> np.ndarray:
    """Decode, convert (RGB or L), resize + centre-crop one image: uint8 [C, H, W].

    resize: the shorter side is first resized to this (torchvision's ``Resize(resize)``) and the centre
    ``image_size`` square cropped (``CenterCrop(image_size)``), as an ImageNet test transform
    (``Resize(256), CenterCrop(224)``); None = resized to ``image_size`` itself.

    16-bit grey and other wide modes are scaled to 8 bits first (:func:`to_8bit`), never clipped.
    Raises PIL's own errors (or UnsupportedImageMode) for unreadable files (the caller decides whether
    to skip); an image over PIL's decompression-bomb limit is one of them (DecompressionBombError).
    """
    with Image.open(path) as handle:
        handle.load()  # decode fully now, so truncation errors surface here
        image = to_8bit(handle).convert(_PIL_MODES[channels])
    if resize is not None and resize != image_size:
        image = _center_crop(_resize_shorter_side(image, resize), image_size)
    else:
        image = resize_and_center_crop(image, image_size)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) of a PIL image: the shorter side to ``size`` (bilinear), aspect kept."""
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), Image.BILINEAR)


def _center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """torchvision's CenterCrop(image_size) of an image at least that large on both sides."""
    width, height = image.size
    if width < image_size or height < image_size:
        raise ValueError(f"a {width}x{height} image cannot be centre-cropped to {image_size}")
    left = int(round((width - image_size) / 2.0))
    top = int(round((height - image_size) / 2.0))
    return image.crop((left, top, left + image_size, top + image_size))


def try_load_image(args: tuple):
    """load_image(*args) for (path, image_size, channels[, resize]), or the decode error it raised."""
    path, image_size, channels = args[:3]
    resize = args[3] if len(args) > 3 else None
    try:
        return load_image(path, image_size, channels, resize)
    except _DECODE_ERRORS as exc:
        return exc


def uint8_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] as x / 127.5 - 1 (the inverse of imageio.to_uint8 on the grid)."""
    return images.to(torch.float32) / 127.5 - 1.0


def check_load_arguments(image_size, channels, on_corrupt) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise IGDSInputError(f"image_size must be a positive integer, got {image_size!r}")
    if image_size > HEADER_CAPS["image side"]:
        raise IGDSInputError(f"image_size {image_size} is above {HEADER_CAPS['image side']} pixels")
    if channels not in _PIL_MODES:
        raise IGDSInputError(f"channels must be 1 or 3, got {channels!r}")
    if on_corrupt not in ON_CORRUPT:
        raise IGDSInputError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")


def check_folder_settings(image_size: int | None, on_corrupt: str, channels: int | None = None) -> None:
    """The one-line checks of a command's image-folder settings: --image-size (None: the command's
    default), --on-corrupt and --channels (None: not a setting of the command)."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise IGDSInputError(f"--image-size must be a positive integer, got {image_size!r}")
    if image_size is not None and image_size > HEADER_CAPS["image side"]:
        raise IGDSInputError(f"--image-size {image_size} is above {HEADER_CAPS['image side']} pixels (a decoded image of "
                             f"{format_bytes(4 * 3 * image_size ** 2)} in float32)")
    if channels is not None and channels not in _PIL_MODES:
        raise IGDSInputError(f"--channels must be 1 or 3, got {channels!r}")
    if on_corrupt not in ON_CORRUPT:
        raise IGDSInputError(f"--on-corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")


def load_image_folder(
    root: str | os.PathLike,
    image_size: int,
    channels: int = 3,
    on_corrupt: str = "skip",
    class_names: Sequence[str] | None = None,
    as_uint8: bool = False,
    num_workers: int | None = None,
    ignore_unlisted: bool = False,
    resize: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str], LoadReport]:
    """Load a whole ImageFolder tree into memory.

    Returns ``(images, labels, class_names, report)``: images float32 [N, C, S, S] in [-1, 1] (uint8
    [0, 255] with ``as_uint8=True``), labels int64 [N] = index of the class in ``class_names``,
    images ordered by class then file name.

    ``on_corrupt``: "skip" leaves unreadable images out and counts them in the report; "fail" raises
    IGDSInputError naming the first unreadable file. Structural problems (missing root, no classes,
    an empty class folder, a class-order mismatch, bad arguments) are raised before any image is
    decoded. A class whose every image is unreadable is an error in both modes.
    ``class_names`` fixes the class order (labels); with ``ignore_unlisted`` folders it does not
    list are skipped instead of being an error.
    ``num_workers`` threads decode in parallel (PIL releases the GIL); default min(8, CPUs).
    """
    check_load_arguments(image_size, channels, on_corrupt)
    names, paths_per_class = scan_image_folder(root, class_names, ignore_unlisted)

    all_paths = [path for paths in paths_per_class for path in paths]
    all_labels = [label for label, paths in enumerate(paths_per_class) for _ in paths]
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    jobs = [(path, image_size, channels, resize) for path in all_paths]
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(try_load_image, jobs))
    else:
        results = [try_load_image(job) for job in jobs]

    images = np.empty((len(all_paths), channels, image_size, image_size), dtype=np.uint8)
    labels = []
    skipped = []
    for path, label, result in zip(all_paths, all_labels, results):
        if isinstance(result, BaseException):
            if on_corrupt == "fail":
                reason = " ".join(str(result).split()) or type(result).__name__
                raise IGDSInputError(f"corrupt image {path!r}: {reason}")
            skipped.append(path)
            continue
        images[len(labels)] = result
        labels.append(label)

    counts = {name: 0 for name in names}
    for label in labels:
        counts[names[label]] += 1
    for name, count in counts.items():
        if count == 0:
            raise IGDSInputError(f"class {name!r} in {os.fspath(root)!r} has no readable images")

    tensor = torch.from_numpy(images[: len(labels)].copy())
    if not as_uint8:
        tensor = uint8_to_unit_range(tensor)
    report = LoadReport(
        root=os.fspath(root),
        class_names=list(names),
        images_per_class=counts,
        num_loaded=len(labels),
        num_skipped_corrupt=len(skipped),
        skipped_paths=skipped,
    )
    return tensor, torch.tensor(labels, dtype=torch.int64), list(names), report


# ---- streamed ImageFolders -----------------------------------------------------------------------
