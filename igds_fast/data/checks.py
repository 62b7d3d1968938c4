"""The one check of labelled image data shared by the training commands (prior, VE, beta calibration).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import IGDSInputError
from .streams import FolderImages



# ---- the labelled-data check of the training commands (train-ve, train-prior, calibrate-beta) -----


def check_labelled_images(
    images,
    labels,
    class_names: Sequence[str],
    *,
    what: str,
    channels: int | tuple[int, ...],
    channels_expected_by: str,
    require_every_class: bool = False,
    accept_folder: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """Refuse a defective labelled image set with a one-line IGDSInputError; return (labels int64, class names).

    images: float [N, C, H, W] in [-1, 1] with labels [N] integers in [0, len(class_names)), or (when
    `accept_folder`) a FolderImages, whose own labels are used (`labels` is ignored) and whose class
    order must be `class_names`. class_names: at least 2 distinct strings. channels: the allowed C
    (`channels_expected_by` names who needs it, for the message). what: "training" / "validation".
    require_every_class: every class must have an image (a VE centroid, a prior class embedding).
    """
    if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not all(isinstance(n, str) for n in class_names):
        raise IGDSInputError("class_names must be a sequence of strings")
    class_names = list(class_names)
    if len(class_names) < 2:
        raise IGDSInputError(f"need at least 2 classes, got {len(class_names)} class name(s)")
    if len(set(class_names)) != len(class_names):
        raise IGDSInputError(f"class_names must be distinct, got {class_names[:10]}")
    allowed = (channels,) if isinstance(channels, int) else tuple(channels)
    folder = accept_folder and isinstance(images, FolderImages)
    if not folder and (not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point()):
        kinds = "tensor in [-1, 1] or a FolderImages" if accept_folder else "tensor in [-1, 1]"
        given = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise IGDSInputError(f"{what} images must be a float [N, C, H, W] {kinds}, got {given}")
    count, image_channels = images.shape[0], images.shape[1]
    if count == 0:
        raise IGDSInputError(f"no {what} images given")
    if image_channels not in allowed:
        raise IGDSInputError(f"{what} images have {image_channels} channel(s); {channels_expected_by} expects "
                             f"{' or '.join(str(c) for c in allowed)}")
    if folder:
        if images.class_names != class_names:
            raise IGDSInputError(f"{what} folder {images.root!r} has classes {images.class_names[:5]}, expected {class_names[:5]} "
                                 "(in this order)")
        labels = images.labels  # the folder's own: in range by construction, pixels in [-1, 1]
    else:
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (count,):
            raise IGDSInputError(f"{what} labels must be a [{count}] tensor matching the images, got {getattr(labels, 'shape', type(labels).__name__)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise IGDSInputError(f"{what} labels must be integers, got {labels.dtype}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= len(class_names):
            raise IGDSInputError(f"{what} labels span [{low}, {high}] but there are {len(class_names)} class names "
                                 f"(labels must lie in [0, {len(class_names) - 1}])")
        if not bool(torch.isfinite(images).all()):
            raise IGDSInputError(f"{what} images contain non-finite values")
        smallest, largest = (float(v) for v in torch.aminmax(images))
        if smallest < -1.0 - 1e-4 or largest > 1.0 + 1e-4:  # the tolerance forgives float rounding of a rescale
            raise IGDSInputError(f"{what} images must lie in [-1, 1], got values in [{smallest:.4g}, {largest:.4g}]")
    if require_every_class:
        counts = torch.bincount(labels.to(torch.long).cpu(), minlength=len(class_names))
        empty = [class_names[c] for c in range(len(class_names)) if int(counts[c]) == 0]
        if empty:
            raise IGDSInputError(f"{what} data has no images of class(es) {empty[:5]} (every class needs images)")
    return labels.to(torch.long), class_names
