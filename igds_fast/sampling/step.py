"""One reverse step, written once: the order every backend follows, and what a step reads.

One guided reverse step at respaced index i (IGDS_SPEC section 3), shapes [B, C, H, W]:

    guided   = GuidanceConfig.guides(i, N)
    eps, v   = UNet(x_t, timestep_map[i], y)               (v only for learned-sigma priors)
    x0_hat   = clip(sqrt(1/abar_i) x_t - sqrt(1/abar_i - 1) eps, -1, 1)
    g        = dJ(x0_hat, y) / d x0_hat     (mode "x0")  or  dJ / d x_t through the UNet (mode "xt")
    record   whether g is finite, per image, on the device (read once per batch)
    mu       = coef1_i x0_hat + coef2_i x_t
    log s2   = learned-range interpolation of (log beta_i, log beta~_i) by (v + 1) / 2
    x_{i-1}  = mu + [guided] s * exp(log s2) * g + [i > 0] exp(log s2 / 2) * n,  n keyed by (seed, i)

The update is one operation with two variants (`StepContext.sampler`); everything before it is the
same. DDIM (sampler "ddim", eta; guided-diffusion's `ddim_sample` with `condition_score`, in its order):

    eps      = (sqrt(1/abar_i) x_t - x0_hat) / sqrt(1/abar_i - 1)          (re-derived from the clipped x0)
    [guided] eps = eps - sqrt(1 - abar_i) * (s * g);  x0 = sqrt(1/abar_i) x_t - sqrt(1/abar_i - 1) eps;
             eps = (sqrt(1/abar_i) x_t - x0) / sqrt(1/abar_i - 1)          (the score shift; x0 not clipped again)
    x_{i-1}  = sqrt(abar_{i-1}) x0 + sqrt(1 - abar_{i-1} - sigma_i^2) eps + [i > 0, eta > 0] sigma_i n

The shift uses the same s * g as DDPM's mean shift s * sigma^2 * g: both add s * g to the score
grad log p(x_t) = -eps / sqrt(1 - abar_i) (condition_mean vs condition_score, Song et al. 2021).

`reverse_step(ops, context, inputs, tracker)` is that order; a backend only supplies the operations
(`StepOps`: eager torch ops, fused Triton kernels, low-precision compiled copies) and, around the
call, its own wrapper (batch splitting, static buffers, a CUDA graph). A step reads a
`StepContext` (schedule, guidance, class map, noise source), never the Sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..diffusion import DDIMTables, DiffusionSchedule
from ..errors import IGDSInputError
from ..guidance import GuidanceConfig, IGDSGuidance
from ..profiling import nvtx_range


@dataclass
class StepContext:
    """What every reverse step reads, built once by the Sampler.

    unet: (x, timesteps [B], y or None) -> [B, 2C or C, H, W]; schedule: tables on `device`;
    guidance_config: the GuidanceConfig; guidance: the eager IGDSGuidance (the reference head and encoder);
    channels, image_size, learn_sigma: the prior's; class_map: VE class -> prior class [num VE
    classes] on the device, or None (identical indices); conditional: the prior takes labels;
    noise: "torch" or "philox"; noise_source: (seeds, stream, shape, device) -> noise [B, *shape];
    noise_keys: (seeds, device) -> the form of a batch's seeds the noise source reads fastest (built
    once per batch); reference_numerics: the eager step runs float32 as float32 on CUDA (sampling.eager);
    sampler: "ddpm" or "ddim" (diffusion.SAMPLERS), the variant of the update; ddim: DDIM's tables at
    the run's eta (None for DDPM).
    """

    unet: Callable
    schedule: DiffusionSchedule
    guidance_config: GuidanceConfig
    guidance: IGDSGuidance
    channels: int
    image_size: int
    learn_sigma: bool
    class_map: torch.Tensor | None
    conditional: bool
    noise: str
    noise_source: Callable
    noise_keys: Callable
    device: torch.device
    reference_numerics: bool = True
    sampler: str = "ddpm"
    ddim: DDIMTables | None = None

    def __post_init__(self):
        if (self.sampler == "ddim") != (self.ddim is not None):
            raise IGDSInputError("a DDIM step needs its tables (DiffusionSchedule.ddim(eta)), and only a DDIM step")

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def prior_labels(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The labels the UNet is conditioned on (None for an unconditional prior)."""
        if not self.conditional:
            return None
        return labels if self.class_map is None else self.class_map.index_select(0, labels)

    def guided(self, i: int) -> bool:
        return self.guidance_config.guides(i, self.num_steps)

    def draws_noise(self, i: int) -> bool:
        """Whether the update at respaced index i adds noise: i > 0, and for DDIM eta > 0."""
        return i > 0 and (self.ddim is None or self.ddim.eta > 0)


@dataclass
class StepInputs:
    """One step's inputs besides x_t: what stays the same for a whole batch, plus i and the noise.

    i: respaced index (host int); index: the same as a 0-d int64 device tensor (kernels read it
    from memory, so a captured graph replays for every i); labels [B] (VE classes) and prior_labels
    on the device; group_ids [B] or None; seeds: per-image noise keys (the noise source's form: a
    list of ints for "torch", an int64 device tensor for "philox") or None; noise: an explicit
    [B, C, H, W] noise tensor or None (then drawn from seeds, or none at all without seeds); trace:
    where the guided steps record their guidance terms (GuidanceTrace), or None.
    """

    i: int
    index: torch.Tensor
    labels: torch.Tensor
    prior_labels: torch.Tensor | None
    group_ids: torch.Tensor | None
    seeds: object
    noise: torch.Tensor | None = None
    trace: "GuidanceTrace | None" = None


class NonFiniteTracker:
    """Per image, the latest respaced index whose guidance gradient was non-finite (-1: none).

    Recording stays on the device (no host synchronisation inside the loop); `raise_if_any` reads
    it once, after a batch's last step, and raises the error naming the earliest bad sampling step.
    """

    def __init__(self, batch: int, device):
        self.latest = torch.full((batch,), -1, dtype=torch.long, device=device)

    def reset(self) -> None:
        self.latest.fill_(-1)

    def record(self, grad: torch.Tensor, index, rows: torch.Tensor | None = None) -> None:
        finite = torch.isfinite(grad).flatten(1).all(dim=1)
        bad = torch.where(finite, -1, index)
        if rows is None:
            torch.maximum(self.latest, bad, out=self.latest)
        else:
            self.latest[rows] = torch.maximum(self.latest[rows], bad)

    def raise_if_any(self, labels: torch.Tensor, num_steps: int) -> None:
        latest_bad = int(self.latest.max())  # the one host read of a batch
        if latest_bad < 0:
            return
        bad_labels = sorted(set(labels[self.latest >= 0].tolist()))
        raise IGDSInputError(
            f"non-finite guidance gradient at sampling step {num_steps - 1 - latest_bad} "
            f"(respaced index {latest_bad}) for labels {bad_labels[:10]}"
        )


TRACE_TERMS = ("log_p_y", "kl", "infonce", "grad_norm", "top1")


class GuidanceTrace:
    """Per step and image, the guidance terms TRACE_TERMS [N, B, 5] in a device buffer (NaN: not guided).

    log p(y|x0), KL(P || Q_y), the InfoNCE term, ||dJ/dx||, VE top-1 agreement — recorded by the
    guided steps without any host read (capturable), read once after the batch (`read`).
    """

    def __init__(self, num_steps: int, batch: int, device):
        self.values = torch.full((num_steps, batch, len(TRACE_TERMS)), float("nan"), device=device)
        self.rows = torch.arange(batch, device=device)

    def reset(self) -> None:
        self.values.fill_(float("nan"))

    def record(self, index: torch.Tensor, terms: torch.Tensor, grad: torch.Tensor, rows=None) -> None:
        row = torch.cat([terms[:, :3], grad.detach().flatten(1).float().norm(dim=1, keepdim=True), terms[:, 3:]], dim=1)
        rows = self.rows if rows is None else rows
        self.values.index_put_((index.reshape(1).expand(rows.shape[0]), rows), row)

    def read(self) -> dict[str, torch.Tensor]:
        """{term: [N, B] float32 on the CPU}, row i = respaced index i (one host read)."""
        values = self.values.cpu()
        return {name: values[:, :, k] for k, name in enumerate(TRACE_TERMS)}


class StepOps:
    """The operations of one step (torch ops; subclasses swap them for kernels or compiled copies).

    unet_fn: the UNet the step runs (the context's, or a low-precision compiled copy);
    guidance: the IGDSGuidance it runs (eager head and encoder, or the kernels' / copies').
    """

    def __init__(self, context: StepContext, unet_fn: Callable | None = None, guidance: IGDSGuidance | None = None):
        self.context = context
        self.unet_fn = context.unet if unet_fn is None else unet_fn
        self.guidance = context.guidance if guidance is None else guidance

    def timesteps(self, inputs: StepInputs, batch: int) -> torch.Tensor:
        return self.context.schedule.timestep_map[inputs.i].expand(batch)

    def step_index(self, inputs: StepInputs):
        """The index the schedule gathers read: the host int (eager)."""
        return inputs.i

    def unet(self, x, inputs: StepInputs) -> torch.Tensor:
        return self.unet_fn(x, self.timesteps(inputs, x.shape[0]), inputs.prior_labels)

    def predict_x0(self, x, model_output, inputs: StepInputs) -> torch.Tensor:
        c = self.context
        eps, _ = c.schedule.split_model_output(model_output, c.channels, c.learn_sigma)
        return c.schedule.predict_x0(x, eps, self.step_index(inputs), clip=c.guidance_config.clip_x0)

    def unet_and_gradient(self, x, inputs: StepInputs):
        """(UNet output, x0_hat, dJ/dx_t, features z or None) with autograd through the UNet (mode xt)."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            with nvtx_range("igds/unet"):
                model_output = self.unet(x_in, inputs)
            x0 = StepOps.predict_x0(self, x_in, model_output, inputs)  # torch ops: autograd sees them
            with nvtx_range("igds/guidance"):
                grad, features = self.guide(x0, inputs, wrt=x_in)
        return model_output.detach(), x0.detach(), grad, features

    def guide(self, x0, inputs: StepInputs, wrt=None):
        """(dJ/d wrt, features z when the step is traced else None) from the step's guidance."""
        out = self.guidance(x0, inputs.labels, inputs.group_ids, wrt=wrt, return_features=inputs.trace is not None)
        return out[1], (out[2] if inputs.trace is not None else None)

    def update(self, x, model_output, x0, grad, inputs: StepInputs) -> torch.Tensor:
        """x_{i-1} from x_t: the DDPM or the DDIM variant (module docstring), by the context's sampler.

        x0: the step's x0 prediction (None: recomputed from the UNet output); grad: the guidance
        gradient g (None: an unguided step); noise: inputs.noise, else drawn from the seeds where the
        variant adds noise (context.draws_noise).
        """
        if self.context.ddim is not None:
            return self.ddim_update(x, model_output, x0, grad, inputs)
        return self.ddpm_update(x, model_output, x0, grad, inputs)

    def step_noise(self, x, inputs: StepInputs) -> torch.Tensor | None:
        """The noise this step adds: the given tensor, else drawn keyed by (seed, i), else None."""
        c = self.context
        if not c.draws_noise(inputs.i):
            return None
        if inputs.noise is None and inputs.seeds is not None:
            return c.noise_source(inputs.seeds, inputs.i, x.shape[1:], x.device)
        return inputs.noise

    def ddim_update(self, x, model_output, x0, grad, inputs: StepInputs) -> torch.Tensor:
        """DDIM: x_{i-1} = sqrt(abar_{i-1}) x0 + sqrt(1 - abar_{i-1} - sigma^2) eps (+ sigma n), the guidance
        as a shift of eps by -sqrt(1 - abar_i) s g (module docstring; guided-diffusion's order)."""
        c = self.context
        i, schedule, tables = inputs.i, c.schedule, c.ddim
        if x0 is None:
            x0 = self.predict_x0(x, model_output, inputs)
        eps = schedule.predict_eps(x, x0, i)
        if grad is not None:
            shift = schedule.gather(tables.sqrt_one_minus_alphas_cumprod, i, x.dim())
            eps = eps - shift * (c.guidance_config.scale * grad)
            x0 = schedule.predict_x0(x, eps, i, clip=False)
            eps = schedule.predict_eps(x, x0, i)
        out = schedule.ddim_mean(x0, eps, i, tables)
        noise = self.step_noise(x, inputs)
        if noise is None:
            return out
        return out + schedule.gather(tables.sigma, i, x.dim()) * noise

    def ddpm_update(self, x, model_output, x0, grad, inputs: StepInputs) -> torch.Tensor:
        """DDPM: x_{i-1} = posterior mean (+ scale * variance * grad) (+ std * noise for i > 0)."""
        c = self.context
        i = inputs.i
        noise = inputs.noise
        if noise is None and inputs.seeds is not None and i > 0:
            noise = c.noise_source(inputs.seeds, i, x.shape[1:], x.device)
        if x0 is None:
            x0 = self.predict_x0(x, model_output, inputs)
        _, v = c.schedule.split_model_output(model_output, c.channels, c.learn_sigma)
        mean = c.schedule.posterior_mean(x0, x, i)
        log_variance = c.schedule.log_variance(x, i, v)
        if grad is not None:
            mean = mean + c.guidance_config.scale * torch.exp(log_variance) * grad
        if i == 0 or noise is None:
            return mean
        return mean + torch.exp(0.5 * log_variance) * noise


def reverse_step(ops: StepOps, x: torch.Tensor, inputs: StepInputs, tracker: NonFiniteTracker | None,
                 rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_{i-1}, UNet output) from x_i = x: the step's order (module docstring), for every backend.

    tracker: where a non-finite gradient is recorded (None: GuidanceConfig.check_finite is off);
    rows: the tracker rows of these images (a part of the batch stepped alone), None = all.
    """
    context = ops.context
    guided = context.guided(inputs.i)
    x0 = grad = features = None
    if guided and context.guidance_config.mode == "xt":
        model_output, x0, grad, features = ops.unet_and_gradient(x, inputs)
    else:
        with torch.no_grad(), nvtx_range("igds/unet"):
            model_output = ops.unet(x, inputs)
        if guided:
            with torch.no_grad():
                x0 = ops.predict_x0(x, model_output, inputs)
            with nvtx_range("igds/guidance"):
                grad, features = ops.guide(x0, inputs)
    with torch.no_grad(), nvtx_range("igds/update"):
        if guided and tracker is not None:
            tracker.record(grad, ops.step_index(inputs), rows)
        if guided and inputs.trace is not None:
            inputs.trace.record(inputs.index, ops.guidance.terms(features, inputs.labels, inputs.group_ids), grad, rows)
        return ops.update(x, model_output, x0, grad, inputs), model_output


__all__ = ["GuidanceTrace", "NonFiniteTracker", "StepContext", "StepInputs", "StepOps", "TRACE_TERMS", "reverse_step"]
