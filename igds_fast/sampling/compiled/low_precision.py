"""Low-precision copies of the user's float32 UNet and encoder, which the compiled backend runs.

The user's modules are never modified: the copies are frozen, eval-mode deep copies with their
floating parameters cast while copying (so no second float32 copy is ever made), optionally in
channels_last; their wrappers take and return float32 (the layout the Triton kernels read).
"""
from __future__ import annotations

import copy
import types
from typing import Any

import torch
import torch.nn as nn

def low_precision_copy(module: nn.Module, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """A frozen eval-mode deep copy of `module` with floating parameters/buffers in `dtype`.

    The original is untouched. Tensors are cast while copying (deepcopy memo), so peak memory is the
    original plus the low-precision copy, never two full-precision copies. Modules that must keep
    float32 statistics do so by themselves (ADM's GroupNorm32 promotes its input and weights).
    """
    # A foreign UNet (models.protocols.ForeignUNet) keeps its own convention: convolutions only.
    convs_only = getattr(module, "low_precision_convs_only", False)
    low = None
    if convs_only:
        low = {id(p) for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
               for p in m.parameters(recurse=False)}
    # Buffers a module names in `low_precision_keep` stay float32 (e.g. a schedule table it converts with).
    keep = {id(buffer) for m in module.modules() for name in getattr(m, "low_precision_keep", ())
            if (buffer := getattr(m, name, None)) is not None}
    memo: dict[int, Any] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) in memo:
            continue
        to_low = tensor.is_floating_point() and (low is None or id(tensor) in low) and id(tensor) not in keep
        cast = tensor.detach().to(dtype) if to_low else tensor.detach().clone()
        if channels_last and cast.dim() == 4:
            cast = cast.contiguous(memory_format=torch.channels_last)
        memo[id(tensor)] = nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast
    duplicate = copy.deepcopy(module, memo)
    if convs_only:  # its forward casts the input to its own `dtype` attribute
        for sub in duplicate.modules():
            if isinstance(vars(sub).get("dtype"), torch.dtype):
                sub.dtype = dtype
    return duplicate.requires_grad_(False).eval()


class LowPrecisionUNet(nn.Module):
    """(x_t [B, C, H, W] fp32, timesteps [B], y [B] or None) -> UNet output [B, 2C or C, H, W] fp32.

    The input is cast to the copy's dtype (and NHWC) inside the compiled region, so the casts fuse
    with the first and last convolutions; the output comes back fp32 and contiguous NCHW, the layout
    the Triton kernels read.
    """

    def __init__(self, unet: nn.Module, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.unet, self.dtype, self.channels_last = unet, dtype, channels_last
        self.eval()  # inference only (the wrapped copy is frozen in eval mode already)

    def forward(self, x, timesteps, y=None):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = self.unet(x.to(self.dtype, memory_format=fmt), timesteps, y)
        return out.to(torch.float32, memory_format=torch.contiguous_format)


class LowPrecisionFeatures(nn.Module):
    """x0_hat [B, C, H, W] fp32 in [-1, 1] -> encoder features z [B, d] fp32, differentiable in x0_hat.

    The preprocess (resize + normalise) runs in fp32 on the shared, unmodified `preprocess` module;
    the encoder runs in its copy's dtype.
    """

    def __init__(self, preprocess: nn.Module, encoder: nn.Module, dtype: torch.dtype, channels_last: bool):
        super().__init__()
        self.preprocess, self.encoder = preprocess, encoder
        self.dtype, self.channels_last = dtype, channels_last

    def forward(self, image):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        pixels = self.preprocess(image).to(self.dtype, memory_format=fmt)
        return self.encoder.forward_features(pixels).float()


def compile_instance(module: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """torch.compile(module), its forward given a code object of its own first.

    Dynamo keeps compiled code per code object and, under fullgraph=True, fails hard once one code
    object has been compiled `recompile_limit` (8) times. Every LowPrecisionUNet (every copy of one
    decoder class) shares one forward, so the ninth compiled sampler a process builds with another
    model, dtype or batch — a bench sweep, a front end's samplers per chunk — would stop with
    FailOnRecompileLimitHit. A per-instance copy of the code gives each sampler its own budget (and
    its cache dies with it). `module` is our own copy, so setting its `forward` touches nothing of the user's.
    """
    forward = type(module).forward
    own = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__,
                             forward.__defaults__, forward.__closure__)
    own.__kwdefaults__ = forward.__kwdefaults__
    module.forward = types.MethodType(own, module)
    return torch.compile(module, **compile_kwargs)


__all__ = ["LowPrecisionFeatures", "LowPrecisionUNet", "compile_instance", "low_precision_copy"]
