"""Passes of a frozen (or momentarily frozen) encoder over a whole image set, batch by batch.

BatchNorm statistics recomputed on clean images, the features of every image, and the per-channel
image statistics that normalise the encoder input. The set is a tensor or a FolderImages /
TensorImages source; nothing of size N x image is held for a streamed one.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from ..data import FolderImages, TensorImages
from ..errors import IGDSInputError
from ..models.resnet import ResNet
from ..preprocess import EncoderPreprocess

FEATURE_BATCH = 256  # images per no-grad forward when extracting features / BN statistics


@contextlib.contextmanager
def frozen_bn_statistics(module: nn.Module):
    """Train-mode BatchNorm (batch statistics) that leaves the running statistics untouched.

    running = (1 - momentum) * running + momentum * batch, so momentum 0 keeps them as they are.
    """
    saved = [(m, m.momentum) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def _as_source(images):
    """A FolderImages / TensorImages as it is; a tensor [N, C, H, W] wrapped (labels unused: zeros)."""
    if isinstance(images, (FolderImages, TensorImages)):
        return images
    return TensorImages(images, torch.zeros(images.shape[0], dtype=torch.long))


@torch.no_grad()
def recompute_batchnorm_statistics(encoder: ResNet, preprocess: EncoderPreprocess, images, device) -> None:
    """Replace the BatchNorm running statistics by their exact average over `images` (clean, in [-1, 1]).

    images: a tensor [N, C, H, W] or a FolderImages / TensorImages source (streamed batch by batch).

    Cumulative averaging (momentum None) over batches of `FEATURE_BATCH`; a last batch of one image
    is merged into the previous one (BatchNorm needs two values per channel at 1x1 maps).
    """
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    encoder.train()
    source = _as_source(images)
    try:
        for batch, _, _ in source.batches(even_chunks(len(source), FEATURE_BATCH), device):
            encoder.forward_features(preprocess(batch))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        encoder.eval()


def even_chunks(count: int, batch_size: int) -> list[slice]:
    """Contiguous slices of about `batch_size` covering 0..count, none smaller than min(2, count)."""
    number = max(1, math.ceil(count / batch_size))
    bounds = [round(i * count / number) for i in range(number + 1)]
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(slices) > 1 and slices[-1].stop - slices[-1].start < 2:
        slices[-2:] = [slice(slices[-2].start, slices[-1].stop)]
    return slices


@torch.no_grad()
def extract_features(encoder: ResNet, preprocess: EncoderPreprocess, images, device) -> torch.Tensor:
    """Frozen-encoder features z [N, d] (float32, on `device`) of images [N, C, H, W] in [-1, 1]
    (a tensor, or a FolderImages / TensorImages source streamed batch by batch)."""
    encoder.eval()
    source = _as_source(images)
    parts = [encoder.forward_features(preprocess(batch)).float()
             for batch, _, _ in source.batches(even_chunks(len(source), FEATURE_BATCH), device)]
    return torch.cat(parts)


def image_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of images [N, C, H, W] in [-1, 1] (float64 sums)."""
    unit = (images.to(torch.float64) + 1.0) * 0.5
    mean = unit.mean(dim=(0, 2, 3))
    std = unit.std(dim=(0, 2, 3), unbiased=False)
    if bool((std <= 1e-6).any()):
        raise IGDSInputError("the training images have a constant channel (std 0): give mean/std explicitly")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
