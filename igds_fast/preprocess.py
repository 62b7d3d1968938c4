"""The encoder's input transform: prior images in [-1, 1] -> what the VE encoder was trained on.

    x [B, C, H, W] in [-1, 1]  ->  (x + 1) / 2 in [0, 1]
                               ->  bilinear resize to resolution x resolution (skipped if equal)
                               ->  (x - mean[c]) / std[c]                       [B, C, R, R]

It sits inside the guidance gradient's differentiable path (dJ/dx flows back through it), so every
operation is a plain differentiable torch op. The fused Triton version is
`igds_fast.kernels.encoder_preprocess`, which computes the same function.

On CUDA the resize runs as two matrix products with the bilinear weights, y = A_h x A_w^T
(`bilinear_resize_matmul`): F.interpolate's CUDA backward scatters with atomics, so its gradient
differs run to run in the last bits, and 250 guided steps carry that into the pixels. The matrix
form's backward is two more products: deterministic, and ~10 GFLOP per step at batch 32 (256 -> 224),
noise beside the UNet. On CPU F.interpolate (deterministic there) is kept.
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
        # What every call would rebuild (the statistics in x's dtype, the resize matrices), built once
        # per (shape, device, dtype) in eager mode. Under torch.compile the graph builds them itself.
        self._cache: dict[tuple, torch.Tensor] = {}

    def _cached(self, key: tuple, build) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return build()
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = build()
        return value

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # .to() / .half() move the buffers: cached copies would be stale
        return super()._apply(fn, recurse)

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
            if _resize_by_matmul(x):
                height, width = x.shape[-2:]
                rows, cols = (
                    self._cached(("resize", side, x.device, x.dtype),
                                 lambda side=side: bilinear_matrix(side, self.resolution, x.device, x.dtype))
                    for side in (height, width)
                )
                x = bilinear_resize_matmul(x, self.resolution, rows, cols)
            else:
                x = F.interpolate(
                    x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                    antialias=False,
                )
        # The output keeps x's dtype (float64 for gradcheck, half/bf16 for a low-precision encoder).
        mean = self._cached(("mean", x.device, x.dtype), lambda: self.mean_buffer.to(x.dtype))
        std = self._cached(("std", x.device, x.dtype), lambda: self.std_buffer.to(x.dtype))
        return (x - mean) / std

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, mean={self.mean}, std={self.std}"


def _resize_by_matmul(x: torch.Tensor) -> bool:
    """Whether the resize takes the deterministic matrix form (on CUDA; see the module docstring)."""
    return x.is_cuda


def bilinear_matrix(in_size: int, out_size: int, device, dtype) -> torch.Tensor:
    """A [out_size, in_size]: row o holds the two bilinear weights of output o (align_corners=False).

    The taps and weights of F.interpolate(mode="bilinear", align_corners=False, antialias=False):
    source position (o + 0.5) * in/out - 0.5, clamped at 0, split between floor and floor + 1
    (clamped at the last pixel). Built on `device` from arange and comparisons only (no host
    values, no scatter): legal inside a CUDA-graph capture and traceable by torch.compile.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32  # F.interpolate's accumulate type
    scale = in_size / out_size
    source = ((torch.arange(out_size, device=device, dtype=compute) + 0.5) * scale - 0.5).clamp_min(0.0)
    lower = source.floor()
    upper_weight = source - lower
    lower_index = lower.to(torch.long)
    upper_index = (lower_index + 1).clamp_max(in_size - 1)
    columns = torch.arange(in_size, device=device)[None, :]
    matrix = (1.0 - upper_weight)[:, None] * (columns == lower_index[:, None]) + upper_weight[:, None] * (
        columns == upper_index[:, None]
    )
    return matrix.to(dtype)


def bilinear_resize_matmul(x: torch.Tensor, size: int, rows: torch.Tensor | None = None,
                           cols: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, C, H, W] -> [B, C, size, size], bilinear (align_corners=False), as A_h @ x @ A_w^T.

    rows / cols: A_h [size, H] and A_w [size, W] when the caller keeps them (`bilinear_matrix`).
    """
    height, width = x.shape[-2:]
    if rows is None:
        rows = bilinear_matrix(height, size, x.device, x.dtype)
    if cols is None:
        cols = rows if width == height else bilinear_matrix(width, size, x.device, x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


__all__ = ["EncoderPreprocess", "IMAGENET_MEAN", "IMAGENET_STD", "bilinear_matrix", "bilinear_resize_matmul"]
