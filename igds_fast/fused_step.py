"""The reverse step on the fused Triton kernels: `Sampler(..., use_kernels=True)` runs this.

Same call as `igds_fast.sampler.EagerStep.__call__(x, i, labels, noise=None, group_ids=None,
seeds=None)` and the same math (x0 mode), split as (shapes [B, C, H, W] unless noted):

    model_output = UNet(x_t, timestep_map[i], y)                        torch      "igds/unet"
    x0_hat       = predict_x0 kernel (x_t, eps; clipped)                Triton     (guided steps only)
    g            = image_guidance(x0_hat, ..., head=guidance_head)      torch encoder fwd/bwd around
                                                                        the fused Triton head  "igds/guidance"
    x_{i-1}      = fused_ddpm_update kernel (recomputes x0_hat; mean,   Triton     "igds/update"
                   variance, guided shift, noise in one pass)

Noise: a given `noise` tensor is loaded as is; with `noise is None and seeds is not None` it is drawn
in-kernel from Philox keyed by (seed, i), i.e. exactly `philox_normal(seeds, i, x.shape[1:])` —
so this step reproduces an eager sampler built with `noise="philox"` (build the fused sampler with
`noise="philox"` too, so that x_T comes from the same stream). The step index lives in device memory
(a view into an arange built once), as do the per-image seeds (converted once per batch and reused
while the same seeds come back), so nothing here copies from the host per step.

Guidance mode "xt" (gradient through the UNet) needs autograd through the UNet, which no elementwise
kernel can replace: such a sampler delegates every step to `EagerStep`, giving it the same Philox
noise this step would draw, so results stay those of the kernels' noise stream.

The guidance head is always the Triton `guidance_head` here (GuidanceConfig.head is ignored).
`GuidanceConfig.check_finite=True` keeps the eager semantics (raise on a non-finite gradient) at the
price of one host synchronisation per guided step; turn it off for CUDA-graph capture.
"""
from __future__ import annotations

import torch

from .guidance import image_guidance
from .kernels import StepTables, fused_ddpm_update, guidance_head, philox_normal, predict_x0, seeds_to_tensor
from .profiling import nvtx_range
from .sampler import EagerStep


class FusedStep:
    """One reverse step x_i -> x_{i-1} on the fused kernels; construct as `FusedStep(sampler)`."""

    def __init__(self, sampler):
        self.sampler = sampler
        schedule = sampler.schedule
        self.tables = StepTables(schedule)  # fp32, contiguous, on the sampling device: built once
        # Device-resident step indices: step i reads self.step_indices[i] (a view, no copy).
        self.step_indices = torch.arange(schedule.num_steps, dtype=torch.int64, device=schedule.device)
        self.eager = EagerStep(sampler) if sampler.guidance.mode == "xt" else None
        self._seed_key: tuple[int, ...] | None = None
        self._seed_tensor: torch.Tensor | None = None

    def step_index(self, i: int) -> torch.Tensor:
        """The device tensor holding respaced index i (0-d view into `step_indices`)."""
        return self.step_indices[i]

    def seed_tensor(self, seeds) -> torch.Tensor | None:
        """Per-image Philox keys as an int64 device tensor, rebuilt only when the seeds change."""
        if seeds is None:
            return None
        device = self.sampler.device
        if torch.is_tensor(seeds):
            return seeds_to_tensor(seeds, device)
        key = tuple(int(seed) for seed in seeds)
        if key != self._seed_key:
            self._seed_tensor = seeds_to_tensor(key, device)
            self._seed_key = key
        return self._seed_tensor

    def __call__(self, x, i: int, labels, noise=None, group_ids=None, seeds=None):
        with self.sampler.eager_numerics(x.device):  # the eager backend's step: float32 as float32 on CUDA too
            return self._call(x, i, labels, noise, group_ids, seeds)

    def _call(self, x, i: int, labels, noise, group_ids, seeds):
        s = self.sampler
        schedule, cfg = s.schedule, s.guidance
        if self.eager is not None:
            if noise is None and seeds is not None and i > 0:
                noise = philox_normal(self.seed_tensor(seeds), i, x.shape[1:], x.device, x.dtype)
            return self.eager(x, i, labels, noise, group_ids, None)

        step = schedule.num_steps - 1 - i
        guided = cfg.guides_step(step)
        index = self.step_index(i)
        timesteps = schedule.timestep_map.index_select(0, index.reshape(1)).expand(x.shape[0])
        prior_labels = s.prior_labels(labels)

        with torch.no_grad(), nvtx_range("igds/unet"):
            model_output = s.unet(x, timesteps, prior_labels)
        grad = None
        if guided:
            with torch.no_grad():
                x0 = predict_x0(x, model_output, index, self.tables, s.learn_sigma, clip=cfg.clip_x0)
            with nvtx_range("igds/guidance"):
                _, grad = image_guidance(
                    x0, labels, s.ve, cfg.beta, s.tau, cfg.gamma, group_ids, guidance_head
                )

        with torch.no_grad(), nvtx_range("igds/update"):
            if guided and cfg.check_finite:
                s.check_finite_gradient(grad, step, labels)
            return fused_ddpm_update(
                x,
                model_output,
                index,
                self.tables,
                s.learn_sigma,
                grad=grad,
                scale=cfg.scale,
                noise=noise,
                seeds=self.seed_tensor(seeds) if noise is None else None,
                clip=cfg.clip_x0,
            )
