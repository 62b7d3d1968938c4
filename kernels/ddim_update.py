"""The DDIM update as one elementwise kernel, the DDPM update's sibling (kernels/ddpm_update.py).

Eager reference: `igds_fast.sampling.step.StepOps.ddim_update` (guided-diffusion's `ddim_sample` with
`condition_score`, in its order). Per element of image b at respaced step i, every coefficient read
from fp32 device tables by a device-side index i:

    x0      = clip(sqrt_recip_abar[i] * x_t - sqrt_recipm1_abar[i] * eps, -1, 1)       (clip optional)
    e       = (sqrt_recip_abar[i] * x_t - x0) / sqrt_recipm1_abar[i]           (eps of the clipped x0)
    [guided] e  = e - sqrt_one_minus_abar[i] * (s * g)                          (the score shift)
             x0 = sqrt_recip_abar[i] * x_t - sqrt_recipm1_abar[i] * e;  e = (sqrt_recip_abar[i] * x_t - x0) / ...
    x_{i-1} = sqrt_abar_prev[i] * x0 + direction[i] * e + [i > 0] sigma[i] * n

A learned-sigma UNet's variance half is never read (DDIM's variance is sigma). Traffic per element:
read x_t, eps, [g], [n] (8 to 16 B), write x_{i-1} (4 B); with eta = 0 the wrapper's caller passes
no noise at all. Noise drawn in-kernel is Philox keyed by (seed, i), exactly `philox_normal(seeds, i,
shape)`, as in the DDPM kernel. The step index is device memory, so a captured CUDA graph replays
the step for whatever index it holds; [i > 0] is decided on the device.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from igds_fast.errors import IGDSInputError

from ._common import check_out, on_device, seeds_to_tensor
from .ddpm_update import NOISE_NONE, NOISE_PHILOX, NOISE_TENSOR, _block, _check_step_index, _image_geometry, _x0_hat
from .philox import philox_normal_block


@triton.jit
def _ddim_update_kernel(
    x_ptr, model_ptr, grad_ptr, noise_ptr, seeds_ptr, out_ptr, step_ptr,
    sra_ptr, srm1_ptr, sqrt_abar_prev_ptr, sqrt_one_minus_abar_ptr, sigma_ptr, direction_ptr,
    scale, numel, model_row_stride,
    CLIP: tl.constexpr, GUIDED: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (cdiv(numel, BLOCK), B); BLOCK is the Philox block size (see the DDPM kernel).
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = pid * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < numel
    step = tl.load(step_ptr)

    x = tl.load(x_ptr + row * numel + offsets, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(model_ptr + row * model_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    sra = tl.load(sra_ptr + step).to(tl.float32)
    srm1 = tl.load(srm1_ptr + step).to(tl.float32)
    x0 = _x0_hat(x, eps, step, sra_ptr, srm1_ptr, CLIP)
    e = (sra * x - x0) / srm1
    if GUIDED:
        g = tl.load(grad_ptr + row * numel + offsets, mask=mask, other=0.0).to(tl.float32)
        e = e - tl.load(sqrt_one_minus_abar_ptr + step).to(tl.float32) * (scale * g)
        x0 = sra * x - srm1 * e
        e = (sra * x - x0) / srm1
    out = tl.load(sqrt_abar_prev_ptr + step).to(tl.float32) * x0 + tl.load(direction_ptr + step).to(tl.float32) * e

    if NOISE == 1:
        n = tl.load(noise_ptr + row * numel + offsets, mask=mask, other=0.0).to(tl.float32)
    elif NOISE == 2:
        n = philox_normal_block(tl.load(seeds_ptr + row), step, start, BLOCK)
    if NOISE != 0:
        sigma = tl.where(step > 0, tl.load(sigma_ptr + step).to(tl.float32), 0.0)
        out = out + sigma * n
    tl.store(out_ptr + row * numel + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


class DDIMStepTables:
    """The tables one fused DDIM step reads, contiguous fp32 on the sampling device, built once.

    schedule: a DiffusionSchedule (its x0-prediction tables); ddim: its `ddim(eta)` tables (sigma,
    direction, sqrt(abar_{i-1}), sqrt(1 - abar_i)); eta: theirs.
    """

    NAMES = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "sqrt_alphas_cumprod_prev",
             "sqrt_one_minus_alphas_cumprod", "sigma", "direction")

    def __init__(self, schedule, ddim):
        self.num_steps = int(schedule.num_steps)
        self.device = schedule.device
        self.eta = float(ddim.eta)
        for name in self.NAMES:
            source = ddim if hasattr(ddim, name) else schedule
            setattr(self, name, getattr(source, name).to(torch.float32).contiguous())

    def as_args(self):
        return tuple(getattr(self, name) for name in self.NAMES)


def fused_ddim_update(x, model_output, step_index, tables: DDIMStepTables, learn_sigma: bool, grad=None,
                      scale: float = 0.0, noise=None, seeds=None, clip: bool = True, *, out=None):
    """x_{i-1} [B, C, H, W] of DDIM (module docstring): `StepOps.ddim_update` in one pass.

    x: x_t [B, C, H, W]; model_output: UNet output [B, 2C or C, H, W] (only eps is read); step_index:
    device integer tensor holding i; tables: DDIMStepTables (build once per sampler); grad: the
    guidance gradient g [B, C, H, W] or None (unguided: g never read); scale: Python float s; noise:
    [B, C, H, W] or None; seeds: per-image Philox keys (int64 device tensor [B] or ints), used only
    when noise is None: the noise is then drawn in-kernel, = `philox_normal(seeds, i, x.shape[1:])`.
    Neither noise nor seeds (what eta = 0 passes) = no noise. Output dtype = x.dtype.
    """
    if not isinstance(tables, DDIMStepTables):
        raise IGDSInputError(f"tables must be DDIMStepTables (built once from the schedule and its ddim(eta)), "
                             f"got {type(tables).__name__}")
    numel, row_stride = _image_geometry(x, model_output, learn_sigma)
    _check_step_index(step_index, tables.device)
    batch = x.shape[0]
    x, model_output = x.contiguous(), model_output.contiguous()
    if grad is not None:
        if grad.shape != x.shape:
            raise IGDSInputError(f"grad must have shape {tuple(x.shape)}, got {tuple(grad.shape)}")
        grad = grad.contiguous()
    seed_tensor = None
    if noise is not None:
        if noise.shape != x.shape:
            raise IGDSInputError(f"noise must have shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        noise_mode, noise = NOISE_TENSOR, noise.contiguous()
    elif seeds is not None:
        seed_tensor = seeds_to_tensor(seeds, x.device)
        if seed_tensor.shape[0] != batch:
            raise IGDSInputError(f"got {seed_tensor.shape[0]} seeds for a batch of {batch}")
        noise_mode = NOISE_PHILOX
    else:
        noise_mode = NOISE_NONE
    result = check_out(out, x.shape, x.dtype, x.device, "out")
    block = _block(numel)
    with on_device(x.device):  # unused pointer arguments get `x` (their branches are compiled out)
        _ddim_update_kernel[(triton.cdiv(numel, block), batch)](
            x, model_output, x if grad is None else grad, x if noise is None else noise,
            x if seed_tensor is None else seed_tensor, result, step_index, *tables.as_args(),
            float(scale), numel, row_stride,
            CLIP=bool(clip), GUIDED=grad is not None, NOISE=noise_mode, BLOCK=block,
        )
    return result
