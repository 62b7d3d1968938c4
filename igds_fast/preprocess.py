"""The encoder's input transform: prior images in [-1, 1] -> what the VE encoder was trained on.

    x [B, C, H, W] in [-1, 1]  ->  (x + 1) / 2 in [0, 1]
                               ->  bilinear resize to resolution x resolution (skipped if equal)
                               ->  (x - mean[c]) / std[c]                       [B, C, R, R]

It sits inside the guidance gradient's differentiable path (dJ/dx flows back through it), so every
operation is a plain differentiable torch op. The fused Triton version is
`igds_fast.kernels.encoder_preprocess`, which computes the same function.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import IGDSInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _channel_stats(values: Sequence[float], name: str) -> tuple[float, ...]:
    try:
        stats = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise IGDSInputError(f"{name} must be a sequence of numbers, got {values!r}") from exc
    if not stats:
        raise IGDSInputError(f"{name} must have one value per channel, got an empty sequence")
    if not all(math.isfinite(v) for v in stats):
        raise IGDSInputError(f"{name} must be finite, got {stats}")
    return stats


class EncoderPreprocess(nn.Module):
    """[-1, 1] images [B, C, H, W] -> normalised encoder input [B, C, resolution, resolution].

    resolution: the encoder's input side. mean, std: per-channel statistics of the encoder's
    training data in [0, 1] units (len == C). `resolution`, `mean`, `std` are kept as plain Python
    values for serialisation; the tensors used in forward are non-persistent [1, C, 1, 1] buffers
    (they follow .to(device) but stay out of state dicts: the VE bundle stores them in its header).
    """

    def __init__(self, resolution: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise IGDSInputError(f"resolution must be a positive int, got {resolution!r}")
        mean = _channel_stats(mean, "mean")
        std = _channel_stats(std, "std")
        if len(mean) != len(std):
            raise IGDSInputError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise IGDSInputError(f"std must be positive, got {std}")
        self.resolution = resolution
        self.mean = mean
        self.std = std
        # float64 buffers: cast to x's dtype in forward, so float64 inputs see the exact statistics
        # and float32 inputs the correctly rounded ones.
        self.register_buffer("mean_buffer", torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std_buffer", torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1), persistent=False)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [-1, 1] -> [B, C, resolution, resolution], differentiable in x."""
        if x.dim() != 4:
            raise IGDSInputError(f"preprocess expects [B, C, H, W] images, got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise IGDSInputError(
                f"preprocess expects {self.channels}-channel images (len(mean)), got {x.shape[1]} channels"
            )
        if not x.is_floating_point():
            raise IGDSInputError(f"preprocess expects floating-point images in [-1, 1], got {x.dtype}")
        x = (x + 1.0) * 0.5
        if x.shape[-2:] != (self.resolution, self.resolution):
            # antialias=False on purpose: plain bilinear is differentiable with a cheap, sparse
            # (4-tap) backward, it is what the fused Triton preprocess kernel computes, and the
            # guidance gradient only ever needs this exact, deterministic map. Antialiased
            # downsampling would widen the filter with the scale and change the function.
            x = F.interpolate(
                x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False, antialias=False
            )
        # The output keeps x's dtype (float64 for gradcheck, half/bf16 for a low-precision encoder).
        return (x - self.mean_buffer.to(x.dtype)) / self.std_buffer.to(x.dtype)

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, mean={self.mean}, std={self.std}"


__all__ = ["EncoderPreprocess", "IMAGENET_MEAN", "IMAGENET_STD"]
