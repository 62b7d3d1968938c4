"""The DDPM reverse step as two elementwise kernels: the x0 prediction and the fused update.

Eager references: `igds_fast.diffusion.DiffusionSchedule.predict_x0 / posterior_mean / log_variance`
and `igds_fast.sampling.step.StepOps.update`. Per element of image b at respaced
step i (every coefficient read from the schedule's device tables by a device-side index i):

    x0_hat  = clip(sqrt_recip_abar[i] * x_t - sqrt_recipm1_abar[i] * eps, -1, 1)     (clip optional)
    mu      = coef1[i] * x0_hat + coef2[i] * x_t
    log s2  = frac * log_betas[i] + (1 - frac) * post_log_var_clipped[i],  frac = (v + 1) / 2
              (learned sigma; otherwise fixed_log_variance[i])
    x_{i-1} = mu + [guided] s * exp(log s2) * g + [i > 0] exp(log s2 / 2) * n

Data flow of one guided step (fp32, bytes per image element):

    UNet ------> model_output [B, C or 2C, H, W]  (eps = channels [0, C), v = channels [C, 2C))
    predict_x0:   read x_t, eps (8 B) -> write x0_hat (4 B)                              12 B
    encoder:      x0_hat -> preprocess -> f -> head -> autograd -> g = dJ/dx0_hat  (torch)
    update:       read x_t, eps, [v], [g], [n] (8 to 20 B) -> write x_{i-1} (4 B)     12-24 B

The update recomputes x0_hat from (x_t, eps) in registers instead of reading the x0_hat buffer: on a
guided step the traffic is the same (eps is read instead of x0_hat), but an UNGUIDED step (outside the
guidance window, or s = 0) then needs no x0 kernel at all — one pass of 12-20 B/element instead of
two — and the update does not depend on a buffer the guidance path may have released. The eager
update block it replaces (posterior_mean, the learned-range log_variance, exp, the guided add, the
noise add; learned sigma, guided, with noise) is about 17 elementwise torch kernels moving about
160 B/element, plus the noise tensor's own write. With noise drawn in-kernel (Philox, see
`kernels/philox.py`) the noise tensor is never materialised: 4 B/element saved over loading it and
8 B/element over drawing it first.

The step index is a device tensor (0-d or [1], any integer dtype) so a captured CUDA graph replays
the step for whatever index that memory holds; [i > 0] is evaluated on the device for the same reason.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from igds_fast.errors import IGDSInputError

from ._common import check_out, on_device, seeds_to_tensor
from .philox import noise_block_size, philox_normal_block

NOISE_NONE, NOISE_TENSOR, NOISE_PHILOX = 0, 1, 2


@triton.jit
def _x0_hat(x, eps, step, sra_ptr, srm1_ptr, CLIP: tl.constexpr):
    """clip(sqrt(1/abar_i) x - sqrt(1/abar_i - 1) eps, -1, 1) in fp32 (predict_x0)."""
    sra = tl.load(sra_ptr + step).to(tl.float32)
    srm1 = tl.load(srm1_ptr + step).to(tl.float32)
    x0 = sra * x - srm1 * eps
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    return x0


@triton.jit
def _predict_x0_kernel(
    x_ptr, model_ptr, out_ptr, step_ptr, sra_ptr, srm1_ptr,
    numel, model_row_stride,
    CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (cdiv(numel, BLOCK), B); numel = C*H*W of one image; eps = first numel of a model row.
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    step = tl.load(step_ptr)
    x = tl.load(x_ptr + row * numel + offsets, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(model_ptr + row * model_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    x0 = _x0_hat(x, eps, step, sra_ptr, srm1_ptr, CLIP)
    tl.store(out_ptr + row * numel + offsets, x0.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ddpm_update_kernel(
    x_ptr, model_ptr, grad_ptr, noise_ptr, seeds_ptr, out_ptr, step_ptr,
    sra_ptr, srm1_ptr, coef1_ptr, coef2_ptr, post_logvar_ptr, log_betas_ptr, fixed_logvar_ptr,
    scale, numel, model_row_stride,
    CLIP: tl.constexpr, LEARN_SIGMA: tl.constexpr, GUIDED: tl.constexpr,
    NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (cdiv(numel, BLOCK), B). BLOCK is the Philox block size (a multiple of 4), so the
    # in-kernel noise of element e is exactly philox_normal(seeds, i, shape)[b, e].
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = pid * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < numel
    step = tl.load(step_ptr)

    x = tl.load(x_ptr + row * numel + offsets, mask=mask, other=0.0).to(tl.float32)
    model_row = model_ptr + row * model_row_stride
    eps = tl.load(model_row + offsets, mask=mask, other=0.0).to(tl.float32)
    x0 = _x0_hat(x, eps, step, sra_ptr, srm1_ptr, CLIP)
    mean = tl.load(coef1_ptr + step).to(tl.float32) * x0 + tl.load(coef2_ptr + step).to(tl.float32) * x

    if LEARN_SIGMA:
        v = tl.load(model_row + numel + offsets, mask=mask, other=0.0).to(tl.float32)
        frac = (v + 1.0) / 2.0
        max_log = tl.load(log_betas_ptr + step).to(tl.float32)
        min_log = tl.load(post_logvar_ptr + step).to(tl.float32)
        log_variance = frac * max_log + (1.0 - frac) * min_log
    else:
        log_variance = tl.load(fixed_logvar_ptr + step).to(tl.float32) + tl.zeros([BLOCK], tl.float32)

    if GUIDED:
        g = tl.load(grad_ptr + row * numel + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = mean + scale * tl.exp(log_variance) * g

    if NOISE == 1:
        n = tl.load(noise_ptr + row * numel + offsets, mask=mask, other=0.0).to(tl.float32)
    elif NOISE == 2:
        n = philox_normal_block(tl.load(seeds_ptr + row), step, start, BLOCK)
    if NOISE != 0:
        # No noise at the last step (i == 0), decided on the device so a graph replay honours it.
        sigma = tl.where(step > 0, tl.exp(0.5 * log_variance), 0.0)
        mean = mean + sigma * n
    tl.store(out_ptr + row * numel + offsets, mean.to(out_ptr.dtype.element_ty), mask=mask)


class StepTables:
    """The coefficient tables one fused step reads, as contiguous fp32 tensors on the sampling device.

    Built once from an `igds_fast.diffusion.DiffusionSchedule` (tables of another float dtype are
    cast once here, never per step).
    """

    NAMES = (
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "posterior_log_variance_clipped",
        "log_betas",
        "fixed_log_variance",
    )

    def __init__(self, schedule):
        self.num_steps = int(schedule.num_steps)
        self.device = schedule.device
        for name in self.NAMES:
            setattr(self, name, getattr(schedule, name).to(torch.float32).contiguous())

    def as_args(self):
        return tuple(getattr(self, name) for name in self.NAMES)


def _tables(schedule) -> StepTables:
    return schedule if isinstance(schedule, StepTables) else StepTables(schedule)


def _check_step_index(step_index: torch.Tensor, device) -> None:
    if not torch.is_tensor(step_index) or step_index.dtype.is_floating_point or step_index.numel() != 1:
        raise IGDSInputError("step_index must be a one-element integer tensor on the sampling device")
    if step_index.device.type != torch.device(device).type:
        raise IGDSInputError(f"step_index is on {step_index.device}, the tables on {device}")


def _image_geometry(x: torch.Tensor, model_output: torch.Tensor, learn_sigma: bool):
    """(numel per image, model-output row stride) after shape checks (no values read)."""
    if x.dim() < 2:
        raise IGDSInputError(f"x must be [B, C, H, W], got {tuple(x.shape)}")
    channels = x.shape[1]
    expected = 2 * channels if learn_sigma else channels
    if model_output.shape != (x.shape[0], expected, *x.shape[2:]):
        raise IGDSInputError(
            f"model output must be {(x.shape[0], expected, *x.shape[2:])} "
            f"(learn_sigma={learn_sigma}), got {tuple(model_output.shape)}"
        )
    numel = x[0].numel()
    return numel, model_output.shape[1] // channels * numel


def _block(numel: int) -> int:
    return noise_block_size(numel)


def predict_x0(x, model_output, step_index, schedule, learn_sigma: bool, clip: bool = True, *, out=None):
    """Clipped x0 prediction [B, C, H, W] from x_t and the eps half of the UNet output.

    Reference: `DiffusionSchedule.predict_x0(x, eps, i, clip)`. x: [B, C, H, W] contiguous;
    model_output: [B, 2C or C, H, W] (eps = first C channels, read in place — no split copy);
    step_index: device integer tensor holding i; schedule: DiffusionSchedule or StepTables.
    Output dtype = x.dtype (computed in fp32). out: optional preallocated output.
    """
    tables = _tables(schedule)
    numel, row_stride = _image_geometry(x, model_output, learn_sigma)
    _check_step_index(step_index, tables.device)
    x, model_output = x.contiguous(), model_output.contiguous()
    result = check_out(out, x.shape, x.dtype, x.device, "out")
    block = _block(numel)
    with on_device(x.device):
        _predict_x0_kernel[(triton.cdiv(numel, block), x.shape[0])](
            x, model_output, result, step_index,
            tables.sqrt_recip_alphas_cumprod, tables.sqrt_recipm1_alphas_cumprod,
            numel, row_stride, CLIP=bool(clip), BLOCK=block,
        )
    return result


def fused_ddpm_update(
    x,
    model_output,
    step_index,
    schedule,
    learn_sigma: bool,
    grad=None,
    scale: float = 0.0,
    noise=None,
    seeds=None,
    clip: bool = True,
    *,
    out=None,
):
    """x_{i-1} [B, C, H, W] = mu + [grad given] scale * sigma^2 * grad + [i > 0] sigma * n.

    `StepOps.update` in one pass (module docstring). x: x_t [B, C, H, W];
    model_output: UNet output [B, 2C or C, H, W]; step_index: device integer tensor holding i;
    schedule: DiffusionSchedule or StepTables (build StepTables once per sampler);
    grad: dJ/dx0_hat [B, C, H, W] or None (= unguided step, g never read); scale: Python float s;
    noise: [B, C, H, W] to add, or None; seeds: per-image Philox keys (int64 device tensor [B], or a
    sequence of ints — converted each call, so pass a tensor in a loop) used only when noise is None:
    the noise is then drawn in-kernel and equals `philox_normal(seeds, i, x.shape[1:])`.
    Neither noise nor seeds = the posterior mean (no noise). Output dtype = x.dtype.
    """
    tables = _tables(schedule)
    numel, row_stride = _image_geometry(x, model_output, learn_sigma)
    _check_step_index(step_index, tables.device)
    batch = x.shape[0]
    x, model_output = x.contiguous(), model_output.contiguous()
    if grad is not None:
        if grad.shape != x.shape:
            raise IGDSInputError(f"grad must have shape {tuple(x.shape)}, got {tuple(grad.shape)}")
        grad = grad.contiguous()
    if noise is not None:
        if noise.shape != x.shape:
            raise IGDSInputError(f"noise must have shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        noise_mode, noise = NOISE_TENSOR, noise.contiguous()
        seed_tensor = None
    elif seeds is not None:
        seed_tensor = seeds_to_tensor(seeds, x.device)
        if seed_tensor.shape[0] != batch:
            raise IGDSInputError(f"got {seed_tensor.shape[0]} seeds for a batch of {batch}")
        noise_mode = NOISE_PHILOX
    else:
        noise_mode, seed_tensor = NOISE_NONE, None
    result = check_out(out, x.shape, x.dtype, x.device, "out")
    block = _block(numel)
    # Unused pointer arguments get `x` (never dereferenced: their branches are compiled out).
    with on_device(x.device):
        _ddpm_update_kernel[(triton.cdiv(numel, block), batch)](
            x, model_output,
            x if grad is None else grad,
            x if noise is None else noise,
            x if seed_tensor is None else seed_tensor,
            result, step_index, *tables.as_args(),
            float(scale), numel, row_stride,
            CLIP=bool(clip), LEARN_SIGMA=bool(learn_sigma), GUIDED=grad is not None,
            NOISE=noise_mode, BLOCK=block,
        )
    return result
