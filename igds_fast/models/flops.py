"""FLOPs of one forward, or of one input-gradient backward, of a model, counted on the meta device.

Counted with torch.utils.flop_counter.FlopCounterMode, which counts matrix products and convolutions
only (a multiply-add counts 2; norms, activations and softmax are not counted). FlopCounterMode has
formulas for the fused CUDA SDPA kernels; on the meta device SDPA runs its math decomposition, whose
two batched matmuls (Q K^T and A V) it counts as aten.bmm. `formula_flops` counts the same from the
shapes forward hooks see, as a check of the counter:

    convolution  2 * out_elements * in_channels/groups * kernel_area   (incl. the 1x1 qkv/proj_out)
    linear       2 * in_features * out_features                         (time/label embedding MLPs)
    attention    2 * T^2 * C  for Q K^T  +  2 * T^2 * C  for A V         (T = H*W tokens, C channels)

The input-gradient backward (frozen weights, no weight gradients): every convolution's and linear's
input gradient is one product of the forward's size, attention's two per forward product (dA = dO V^T,
dV = A^T dO, dQ = dS K, dK = dS^T Q): conv + linear + 2 * attention (`backward_formula`).

bench/model_stats.py prints these counts for the ADM and DiT presets (bench/RESULTS.md); `igds-fast
distill --plan` (igds_fast/distill/cost.py) counts the run's own models the same way.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from .adm import AttentionBlock
from .dit import Attention as DiTAttention


def _diffusers_attention_types() -> tuple:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:
        return ()
    return (Attention,)


def formula_flops(model: nn.Module, run: Callable[[], object]) -> dict[str, int]:
    """FLOPs by category (convolution, linear, attention) from the shapes seen by forward hooks while `run()` executes."""
    totals = {"convolution": 0, "linear": 0, "attention": 0}
    diffusers_attention = _diffusers_attention_types()

    def count(module, inputs, output):
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            totals["convolution"] += 2 * output.numel() * per_output
        elif isinstance(module, nn.Linear):
            totals["linear"] += 2 * output.numel() * module.in_features
        elif isinstance(module, AttentionBlock):
            batch, channels = output.shape[:2]
            tokens = math.prod(output.shape[2:])
            totals["attention"] += batch * 2 * (2 * tokens * tokens * channels)
        elif isinstance(module, DiTAttention):  # [B, T, D]
            batch, tokens, channels = output.shape
            totals["attention"] += batch * 2 * (2 * tokens * tokens * channels)
        elif diffusers_attention and isinstance(module, diffusers_attention):  # the VAE's: [B, C, H, W]
            batch = output.shape[0]
            tokens = math.prod(output.shape[2:]) if output.dim() == 4 else output.shape[1]
            totals["attention"] += batch * 2 * (2 * tokens * tokens * module.inner_dim)

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return totals


def counted_flops(run: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs by aten op) that FlopCounterMode counts while `run()` executes."""
    # Imported here: torch.utils.flop_counter imports triton, which must come after the planner has chosen
    # the Triton interpreter on a CPU (sampling/backends.py check_triton_runs_on).
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    by_op = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def forward_flops(model, *inputs) -> int:
    """FLOPs of model(*inputs) (a module or any callable) without gradients (build model and inputs on the meta device: nothing is allocated)."""
    def run():
        with torch.no_grad():
            model(*inputs)
    return counted_flops(run)[0]


def input_backward_flops(forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs of d(output)/d(input) . v (torch.autograd.grad w.r.t. the input; frozen weights), counted.

    The forward runs outside the counter (FlopCounterMode's module hooks refuse a grad() w.r.t. a leaf
    whose forward they saw), then the backward alone is counted."""
    leaf = example.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        output = forward(leaf)
        return counted_flops(lambda: torch.autograd.grad(output, leaf, grad_outputs=torch.ones_like(output)))


def resnet_forward_flops(arch: str, in_channels: int, resolution: int, image_shape: tuple[int, int, int]) -> int:
    """One forward of a ResNet trunk (igds_fast.models.resnet) on an image [C, S, S] resized to `resolution`
    by EncoderPreprocess first (resizing is not counted), on the meta device."""
    from ..preprocess import EncoderPreprocess
    from .resnet import build_resnet

    with torch.device("meta"):
        encoder = build_resnet(arch, num_classes=None, in_channels=in_channels).eval()
        preprocess = EncoderPreprocess(resolution, (0.5,) * in_channels, (0.5,) * in_channels)
        image = torch.randn(1, *image_shape)
    return forward_flops(lambda x: encoder.forward_features(preprocess(x)), image)


def backward_formula(forward: dict[str, int]) -> dict[str, int]:
    """Input-gradient backward FLOPs from the forward's formula (module docstring)."""
    return {"convolution": forward["convolution"], "linear": forward["linear"], "attention": 2 * forward["attention"]}


__all__ = ["backward_formula", "counted_flops", "formula_flops", "forward_flops", "input_backward_flops",
           "resnet_forward_flops"]
