"""The reverse step on the fused Triton kernels: `Sampler(..., backend="fused")` runs this.

The same `reverse_step` as the eager step, with these operations (x0 mode; shapes [B, C, H, W]):

    model_output = UNet(x_t, timestep_map[i], y)                        torch      "igds/unet"
    x0_hat       = predict_x0 kernel (x_t, eps; clipped)                Triton     (guided steps only)
    g            = IGDSGuidance with the Triton guidance head           torch encoder fwd/bwd around
                                                                        the fused head  "igds/guidance"
    x_{i-1}      = fused_ddpm_update kernel (recomputes x0_hat; mean,   Triton     "igds/update"
                   variance, guided shift, noise in one pass), or
                   fused_ddim_update for sampler "ddim" (x0_hat, eps, the
                   score shift, DDIM's mean and sigma * noise in one pass)

Noise: a given `noise` tensor is loaded as is; otherwise it is drawn in-kernel from Philox keyed by
(seed, i), i.e. exactly `philox_normal(seeds, i, x.shape[1:])`, so this step reproduces an eager
sampler built with `noise="philox"`. The step index lives in device memory (a view of an arange
built once) and the per-image keys are converted once per batch: nothing is copied from the host
per step. The kernel path runs under PyTorch's default numerics (it is a fast path: no reference
float32 settings).

`KernelOps` (the kernels' operations) is also what the compiled backend runs, with its own UNet and
encoder copies. Guidance mode "xt" (gradient through the UNet) needs autograd through the UNet: on a
guided step x0_hat is the torch expression (autograd sees it) and the gradient flows from the Triton
head back through the encoder and the UNet; the update is still the fused kernel. The guidance head is
always the Triton `guidance_head` here, in both modes (GuidanceConfig.head applies to eager only).
"""
from __future__ import annotations

import contextlib

import torch

from ..kernels import DDIMStepTables, StepTables, fused_ddim_update, fused_ddpm_update, guidance_head, predict_x0
from .eager import EagerStep
from .step import StepContext, StepInputs, StepOps


class KernelOps(StepOps):
    """The step's operations on the Triton kernels (x0 prediction, guidance head, fused update).

    tables: the fp32 coefficient tables (built once); unet_fn / features / decoder: what runs the UNet,
    the encoder forward and a latent prior's decoder (the context's float32 models, or the compiled
    backend's copies); out_in_place:
    the update writes x_{i-1} over x_t (the compiled backend's static buffer).
    """

    def __init__(self, context: StepContext, tables: StepTables, unet_fn=None, features=None, out_in_place=False,
                 decoder=None):
        super().__init__(context, unet_fn,
                         context.guidance.with_operations(head=guidance_head, features=features, decoder=decoder))
        self.tables = tables
        self.ddim_tables = None if context.ddim is None else DDIMStepTables(context.schedule, context.ddim)
        self.out_in_place = out_in_place

    def timesteps(self, inputs: StepInputs, batch: int) -> torch.Tensor:
        return self.context.schedule.timestep_map.index_select(0, inputs.index.reshape(1)).expand(batch)

    def step_index(self, inputs: StepInputs):
        return inputs.index  # device memory: a captured graph replays for every i

    def predict_x0(self, x, model_output, inputs: StepInputs) -> torch.Tensor:
        c = self.context
        return predict_x0(x, model_output, inputs.index, self.tables, c.learn_sigma, clip=c.guidance_config.clip_x0)

    def update(self, x, model_output, x0, grad, inputs: StepInputs) -> torch.Tensor:
        c = self.context
        if self.ddim_tables is not None:
            noisy = self.ddim_tables.eta > 0  # eta = 0: no noise read or drawn (sigma is 0 at every step)
            return fused_ddim_update(
                x, model_output, inputs.index, self.ddim_tables, c.learn_sigma, grad=grad,
                scale=c.guidance_config.scale, noise=inputs.noise if noisy else None,
                seeds=inputs.seeds if noisy and inputs.noise is None else None, clip=c.guidance_config.clip_x0,
                out=x if self.out_in_place else None,  # elementwise, same index: read before overwritten
            )
        return fused_ddpm_update(
            x, model_output, inputs.index, self.tables, c.learn_sigma, grad=grad, scale=c.guidance_config.scale,
            noise=inputs.noise, seeds=inputs.seeds if inputs.noise is None else None, clip=c.guidance_config.clip_x0,
            # Elementwise and same-index: each element is read before it is overwritten.
            out=x if self.out_in_place else None,
        )


class FusedStep(EagerStep):
    """The stepper of `Sampler(backend="fused")`: the eager step's loop on `KernelOps`."""

    def __init__(self, context: StepContext):
        super().__init__(context)
        self.tables = StepTables(context.schedule)  # fp32, contiguous, on the sampling device: built once
        self.ops = KernelOps(context, self.tables)

    def numerics(self):
        return contextlib.nullcontext()  # PyTorch's defaults: the kernel path is a fast path


__all__ = ["FusedStep", "KernelOps"]
