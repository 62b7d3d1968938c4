"""Encoder input preprocessing, forward and backward, each as one Triton gather pass.

Eager reference: `igds_fast.preprocess.EncoderPreprocess` —

    y = (interpolate((x + 1) / 2, size, mode="bilinear", align_corners=False, antialias=False)
         - mean[c]) / std[c]

x: [B, C, H, W] in [-1, 1] (the x0 prediction); y: [B, C, OH, OW], the encoder input; mean, std: [C]
(or any shape with C elements, e.g. the [1, C, 1, 1] buffers). Bilinear with align_corners=False
as PyTorch computes it, per output row (and likewise per column), scale = H / OH in fp32:

    src = max((oh + 0.5) * scale - 0.5, 0),  h0 = min(floor(src), H - 1),  h1 = min(h0 + 1, H - 1)
    lam = src - h0;  y = (1-lam_h)((1-lam_w) x[h0,w0] + lam_w x[h0,w1]) + lam_h(...row h1...)

Forward: one program per (image plane, block of output pixels) gathers its four taps, maps them to
[0, 1], interpolates and normalises in registers: x is read once (taps hit cache) and y written once,
8 B/output element in fp32, where the torch sequence runs three kernels (affine, interpolate,
normalise) with two intermediate tensors (~28 B/element).

Backward: dL/dx[h, w] = (0.5 / std[c]) * sum_{oh, ow} Wh[oh, h] Ww[ow, w] dL/dy[oh, ow]. PyTorch
scatters this with atomics into a zeroed buffer (non-deterministic in fp32); here each input pixel
GATHERS from the output rows/columns whose taps can reach it — a window of ceil(2 / scale) + 3
candidates per axis, starting at floor((h - 0.5) / scale - 0.5) - 1, each weight recomputed exactly as
the forward computes it (so candidates that do not touch h contribute 0). Deterministic, no zero-fill,
no atomics; 8 B/input element plus cached re-reads of dL/dy.

`EncoderPreprocessFunction` is the autograd wrapper (no gradient for mean/std: they are buffers).

Not on a product path yet, and why it stays: the kernel path's preprocess is the VE's own
`EncoderPreprocess` (on CUDA two GEMMs with the bilinear matrices, cached per batch shape, inside
the compiled encoder, where inductor fuses the affine maps around them). Whether this gather kernel
beats that there is a GPU measurement (`bench/kernels.py`, "preprocess forward/backward", against
the eager sequence), not yet made: no GPU has been lent to this project's sessions. It is tested
against the eager reference (tests/test_kernels_preprocess.py), so wiring it into
`sampling.fused.KernelOps` is a one-line change once a GPU run shows it faster.
"""
from __future__ import annotations

import math

import numpy as np
import triton
import triton.language as tl

import torch

from igds_fast.errors import IGDSInputError

from ._common import check_out, next_pow2, on_device


@triton.jit
def _source_taps(dst, scale, in_size):
    """(i0, i1, lambda) of output index `dst` along one axis, align_corners=False, PyTorch order."""
    src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # truncation == floor: src >= 0
    lam = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = tl.minimum(i0 + 1, in_size - 1)
    return i0, i1, lam


@triton.jit
def _preprocess_fwd_kernel(x_ptr, mean_ptr, std_ptr, y_ptr, C, H, W, OH, OW, scale_h, scale_w,
                           BLOCK: tl.constexpr):
    # grid (cdiv(OH*OW, BLOCK), B*C): one image plane per grid column.
    plane = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < OH * OW
    oh, ow = offsets // OW, offsets % OW
    h0, h1, lam_h = _source_taps(oh, scale_h, H)
    w0, w1, lam_w = _source_taps(ow, scale_w, W)
    src = x_ptr + plane * H * W
    # (x + 1) / 2 on each tap before interpolating: the eager order of operations.
    x00 = (tl.load(src + h0 * W + w0, mask=mask, other=0.0).to(tl.float32) + 1.0) * 0.5
    x01 = (tl.load(src + h0 * W + w1, mask=mask, other=0.0).to(tl.float32) + 1.0) * 0.5
    x10 = (tl.load(src + h1 * W + w0, mask=mask, other=0.0).to(tl.float32) + 1.0) * 0.5
    x11 = (tl.load(src + h1 * W + w1, mask=mask, other=0.0).to(tl.float32) + 1.0) * 0.5
    value = (1.0 - lam_h) * ((1.0 - lam_w) * x00 + lam_w * x01) + lam_h * ((1.0 - lam_w) * x10 + lam_w * x11)
    channel = plane % C
    mean = tl.load(mean_ptr + channel).to(tl.float32)
    std = tl.load(std_ptr + channel).to(tl.float32)
    value = tl.div_rn(value - mean, std + tl.zeros_like(value))
    tl.store(y_ptr + plane * OH * OW + offsets, value.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _axis_weight(src_index, dst, scale, in_size, out_size):
    """Weight with which output index `dst` reads input index `src_index` (0 if not a tap)."""
    i0, i1, lam = _source_taps(dst, scale, in_size)
    valid = (dst >= 0) & (dst < out_size)
    weight = tl.where(i0 == src_index, 1.0 - lam, 0.0) + tl.where(i1 == src_index, lam, 0.0)
    return tl.where(valid, weight, 0.0)


@triton.jit
def _preprocess_bwd_kernel(gy_ptr, std_ptr, gx_ptr, C, H, W, OH, OW, scale_h, scale_w,
                           WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr, BLOCK: tl.constexpr):
    # grid (cdiv(H*W, BLOCK), B*C): every input pixel gathers from its candidate output window.
    plane = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < H * W
    h, w = offsets // W, offsets % W
    first_oh = tl.maximum(tl.floor((h.to(tl.float32) - 0.5) / scale_h - 0.5).to(tl.int32) - 1, 0)
    first_ow = tl.maximum(tl.floor((w.to(tl.float32) - 0.5) / scale_w - 0.5).to(tl.int32) - 1, 0)
    grad_plane = gy_ptr + plane * OH * OW
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for dh in tl.static_range(WINDOW_H):
        oh = first_oh + dh
        weight_h = _axis_weight(h, oh, scale_h, H, OH)
        row = tl.zeros([BLOCK], dtype=tl.float32)
        for dw in tl.static_range(WINDOW_W):
            ow = first_ow + dw
            weight_w = _axis_weight(w, ow, scale_w, W, OW)
            tap = mask & (weight_h != 0.0) & (weight_w != 0.0)
            g = tl.load(grad_plane + oh * OW + ow, mask=tap, other=0.0).to(tl.float32)
            row += weight_w * g
        acc += weight_h * row
    std = tl.load(std_ptr + plane % C).to(tl.float32)
    acc = tl.div_rn(acc, std + tl.zeros_like(acc)) * 0.5
    tl.store(gx_ptr + plane * H * W + offsets, acc.to(gx_ptr.dtype.element_ty), mask=mask)


def _fp32_scale(in_size: int, out_size: int) -> float:
    # PyTorch computes the scale as float(in) / out in fp32: do the same correctly rounded division.
    return float(np.float32(in_size) / np.float32(out_size))


def _window(scale: float) -> int:
    return int(math.ceil(2.0 / scale)) + 3


def _plan(x_shape, size):
    if len(x_shape) != 4:
        raise IGDSInputError(f"preprocess expects [B, C, H, W] images, got {tuple(x_shape)}")
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if out_h <= 0 or out_w <= 0:
        raise IGDSInputError(f"output size must be positive, got {(out_h, out_w)}")
    return out_h, out_w


def _channel_vector(values: torch.Tensor, channels: int, name: str, device) -> torch.Tensor:
    flat = torch.as_tensor(values, device=device).reshape(-1)
    if flat.numel() != channels:
        raise IGDSInputError(f"{name} must have {channels} elements (one per channel), got {flat.numel()}")
    return flat.to(torch.float32).contiguous()


def preprocess_forward(x, mean, std, size, *, out=None) -> torch.Tensor:
    """y = (bilinear((x + 1) / 2, size) - mean) / std, [B, C, OH, OW] in x's dtype (fp32 math)."""
    out_h, out_w = _plan(x.shape, size)
    batch, channels, height, width = x.shape
    mean = _channel_vector(mean, channels, "mean", x.device)
    std = _channel_vector(std, channels, "std", x.device)
    x = x.contiguous()
    y = check_out(out, (batch, channels, out_h, out_w), x.dtype, x.device, "out")
    if y.numel() == 0:
        return y
    block = min(1024, max(16, next_pow2(out_h * out_w)))
    with on_device(x.device):
        _preprocess_fwd_kernel[(triton.cdiv(out_h * out_w, block), batch * channels)](
            x, mean, std, y, channels, height, width, out_h, out_w,
            _fp32_scale(height, out_h), _fp32_scale(width, out_w), BLOCK=block,
        )
    return y


def preprocess_backward(grad_y, std, input_hw, *, out=None) -> torch.Tensor:
    """dL/dx [B, C, H, W] from dL/dy [B, C, OH, OW] (the transpose of `preprocess_forward`)."""
    batch, channels, out_h, out_w = grad_y.shape
    height, width = int(input_hw[0]), int(input_hw[1])
    std = _channel_vector(std, channels, "std", grad_y.device)
    grad_y = grad_y.contiguous()
    grad_x = check_out(out, (batch, channels, height, width), grad_y.dtype, grad_y.device, "out")
    if grad_x.numel() == 0:
        return grad_x
    scale_h, scale_w = _fp32_scale(height, out_h), _fp32_scale(width, out_w)
    block = min(512, max(16, next_pow2(height * width)))
    with on_device(grad_y.device):
        _preprocess_bwd_kernel[(triton.cdiv(height * width, block), batch * channels)](
            grad_y, std, grad_x, channels, height, width, out_h, out_w, scale_h, scale_w,
            WINDOW_H=_window(scale_h), WINDOW_W=_window(scale_w), BLOCK=block,
        )
    return grad_x


class EncoderPreprocessFunction(torch.autograd.Function):
    """Autograd wrapper: forward `preprocess_forward`, backward `preprocess_backward`."""

    @staticmethod
    def forward(ctx, x, mean, std, size):
        y = preprocess_forward(x, mean, std, size)
        ctx.save_for_backward(_channel_vector(std, x.shape[1], "std", x.device))
        ctx.input_hw = (x.shape[2], x.shape[3])
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (std,) = ctx.saved_tensors
        grad_x = preprocess_backward(grad_y, std, ctx.input_hw) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def encoder_preprocess(x, mean, std, size) -> torch.Tensor:
    """Differentiable fused preprocessing: [-1, 1] images -> normalised encoder input at `size`.

    x: [B, C, H, W]; mean, std: C values (tensor of any shape); size: int or (OH, OW).
    """
    return EncoderPreprocessFunction.apply(x, mean, std, size)
