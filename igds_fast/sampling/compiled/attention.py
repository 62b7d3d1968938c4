"""Attention in the compiled backend's UNet copy: fused SDPA (default) or xformers, chosen by measurement.

The copy's ADM attention blocks are rebound (the user's model keeps its own method) to an
implementation on `AttentionBlock.split_heads`' contiguous 4-D [B, H, T, c] tensors, which the fused
SDPA kernels take — their softmax statistics are fp32 whatever the input dtype — or xformers'
memory-efficient kernel ([B, T, H, c]). On CPU a low-precision copy computes SDPA in float32 (the
workaround in `_sdpa_attention`).
"""
from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn as nn

from ...errors import IGDSInputError
from .low_precision import LowPrecisionUNet


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build that fails at import
        return False
    return True


def _attention_blocks(unet: nn.Module) -> list[nn.Module]:
    """ADM attention blocks (they expose `_attention(qkv)`, `split_heads` and `merge_heads`)."""
    return [m for m in unet.modules() if all(hasattr(m, name) for name in ("_attention", "split_heads", "merge_heads"))]


def _sdpa_attention(block: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """ADM's attention through a fused SDPA kernel: qkv [B, 3*H*c, T] -> [B, H*c, T].

    On CPU a low-precision copy computes the attention itself in float32 (workaround below); on
    CUDA the fused kernels take bf16/fp16 directly (their softmax statistics are fp32).
    """
    q, k, v = block.split_heads(qkv)
    if qkv.device.type == "cpu" and qkv.dtype != torch.float32:
        # Workaround, torch 2.13 CPU, inductor's C++ backend: the digits prior's middle-block attention
        # (64 channels, 2 heads of 32, T = 64, legacy order) compiled in bf16 returned NaN for every
        # input on an Intel Xeon with AVX-512, while eager bf16, aot_eager and SDPA alone on the same
        # contiguous q/k/v were finite. Not reproduced on AMD EPYC (Zen 4): a CPU-dependent path,
        # perhaps ATen's bf16 CPU flash attention, which packs for AMX tiles where a CPU has them
        # (unconfirmed). Upstream reproduction, as reported:
        #     block = AttentionBlock(64, num_head_channels=32); lp = low_precision_copy(block, torch.bfloat16, True)
        #     set_attention(lp, "sdpa"); torch.compile(lp, fullgraph=True)(torch.randn(2, 64, 8, 8).bfloat16())
        # The float32 kernel (which takes MKL's GEMMs) sidesteps the bf16 CPU flash-attention path;
        # the cast costs nothing that matters on CPU, which is for testing. The first-step
        # self-check (sampling/compiled/self_check.py) catches any fault of this kind that is left.
        out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(qkv.dtype)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as ADM
    return block.merge_heads(out)


def _xformers_attention(block: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """ADM's attention on xformers' memory-efficient kernel: qkv [B, 3*H*c, T] -> [B, H*c, T]."""
    import xformers.ops as xops

    q, k, v = (t.transpose(1, 2) for t in block.split_heads(qkv))  # xformers: [B, T, H, c]
    out = xops.memory_efficient_attention(q, k, v)  # default scale 1/sqrt(c), as SDPA and ADM
    return block.merge_heads(out.transpose(1, 2))


ATTENTION_IMPLEMENTATIONS = {"sdpa": _sdpa_attention, "xformers": _xformers_attention}


def set_attention(unet: nn.Module, name: str) -> int:
    """Route every ADM attention block of `unet` (a copy: this rebinds methods) through `name`.

    name: "sdpa" (fused SDPA kernels, 4-D contiguous layout) or "xformers". Returns the block count.
    """
    blocks = _attention_blocks(unet)
    for block in blocks:
        block._attention = types.MethodType(ATTENTION_IMPLEMENTATIONS[name], block)
    return len(blocks)


def _median_forward_ms(unet: nn.Module, x, timesteps, y, repeats: int = 5) -> float:
    with torch.no_grad():
        unet(x, timesteps, y)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            unet(x, timesteps, y)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def resolve_attention(choice: str, unet_lp: LowPrecisionUNet, context, compiled: bool = False) -> str:
    """Install the attention implementation into the copy `unet_lp`; returns "sdpa" or "xformers".

    "auto" picks xformers only when it is importable, the device is CUDA, an eager forward of the
    copy at batch 2 measures faster with it than with SDPA (`faster_attention`), and — when the UNet
    is to be compiled with fullgraph=True — dynamo traces its attention without a graph break (an
    xformers build without torch custom-op registration would otherwise fail the compile).
    """
    blocks = _attention_blocks(unet_lp.unet)
    if choice == "xformers":
        if not xformers_available():
            raise IGDSInputError("attention='xformers' but xformers is not importable; use 'sdpa' or 'auto'")
        if not blocks:
            raise IGDSInputError("attention='xformers' needs an ADM UNet (no ADM attention blocks found)")
    set_attention(unet_lp.unet, "xformers" if choice == "xformers" else "sdpa")
    device = context.device
    if choice != "auto" or not (blocks and xformers_available() and device.type == "cuda"):
        return "xformers" if choice == "xformers" else "sdpa"
    # Probe inputs from a generator of their own: the choice must not consume the user's RNG stream.
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, *context.image_shape, device=device, generator=generator)
    timesteps = torch.full((2,), 500, dtype=torch.long, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device) if context.conditional else None
    chosen = faster_attention(unet_lp.unet, lambda: _median_forward_ms(unet_lp, x, timesteps, y))
    if chosen == "xformers" and compiled:
        block = blocks[0]
        qkv = torch.randn(2, block.qkv.out_channels, 64, device=device, dtype=unet_lp.dtype, generator=generator)
        if not traces_in_one_graph(block._attention, qkv):
            set_attention(unet_lp.unet, "sdpa")
            return "sdpa"
    return chosen


def traces_in_one_graph(fn: Callable, *args) -> bool:
    """Whether dynamo captures fn(*args) as one graph (fullgraph=True), run without code generation."""
    try:
        torch.compile(lambda *a: fn(*a), backend="eager", fullgraph=True, dynamic=False)(*args)
    except Exception:  # a graph break (Unsupported) or any tracing failure: not compilable in one graph
        return False
    return True


def faster_attention(unet: nn.Module, forward_ms: Callable[[], float]) -> str:
    """Time `forward_ms()` with SDPA then xformers installed in `unet`; keep (and return) the faster.

    Ties keep SDPA (no optional dependency on the hot path without a measured gain).
    """
    set_attention(unet, "sdpa")
    sdpa_ms = forward_ms()
    set_attention(unet, "xformers")
    if forward_ms() < sdpa_ms:
        return "xformers"
    set_attention(unet, "sdpa")
    return "sdpa"


__all__ = ["ATTENTION_IMPLEMENTATIONS", "faster_attention", "resolve_attention", "set_attention",
           "traces_in_one_graph", "xformers_available"]
