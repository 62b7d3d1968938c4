"""Train a small ADM-architecture DDPM prior on an in-memory image set, and save / load it.

The network is the project's `ADMUNet` (guided-diffusion's UNetModel, built from create_model flags),
so a prior trained here runs through exactly the sampler code path of the public ImageNet ADM
checkpoints. Training follows Ho et al. 2020 / Nichol & Dhariwal 2021:

    t ~ Uniform{0 .. T-1} (T = diffusion_steps = 1000), eps ~ N(0, I)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    L_simple = mean over pixels of (eps - eps_theta(x_t, t, y))^2
    learn_sigma: L = L_simple + (T / 1000) * L_vb, where L_vb is the per-timestep variational-bound
        term in bits/dim (KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the discretised decoder
        NLL at t = 0) computed with a stop-gradient on the mean: guided-diffusion's "hybrid" loss
        (LossType.RESCALED_MSE), which is lambda = 0.001 of the full-bound weight T * L_t.
    AdamW, linear warm-up, gradient-norm clipping, EMA of the weights (the EMA is what is saved and
    what samples). Seeded: initialisation, batch order, timesteps and noise all come from `seed`.

Why learned sigma is the default: the distiller samples with few respaced steps (tens, not 1000),
and guided-diffusion's learned-range variance is what keeps few-step DDPM samples clean (Nichol &
Dhariwal, section 4); the VB term costs one extra elementwise pass, nothing in the UNet.

The saved artifact is ours, not a guided-diffusion .pt: one safetensors file with the EMA weights
(ADMUNet state-dict keys) and a JSON header under the metadata key `igds_prior` holding the
create_model flags, the diffusion (ScheduleConfig) fields, the class names and the training
settings. `load_prior(path)` rebuilds `(unet, schedule_config, class_names)`.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .data import check_labelled_images
from .devices import resolve_device
from .diffusion import NOISE_SCHEDULES, DiffusionSchedule, ScheduleConfig
from .errors import IGDSInputError
from .limits import HEADER_CAPS
from .models.adm import ADMUNet
from .settings import option, section

FORMAT_NAME = "igds_prior"
FORMAT_VERSION = 1
METADATA_KEY = "igds_prior"
LOG2 = math.log(2.0)


@dataclass(frozen=True)
class PriorTrainConfig:
    """Architecture (guided-diffusion create_model flags), diffusion and optimisation of a prior.

    Architecture: num_channels (a multiple of 32: GroupNorm(32)), channel_mult ("1,2": one
    down-sampling), num_res_blocks, attention_resolutions (comma-separated feature-map sides, as the
    create_model flag; "" = attention only in the middle block), num_head_channels, dropout,
    use_scale_shift_norm, resblock_updown, class_cond, learn_sigma.
    Diffusion: noise_schedule ("cosine" suits small images: the linear schedule spends most of its
    steps on nearly pure noise at low resolution), diffusion_steps T.
    Optimisation: steps, batch_size, lr (AdamW, linear warm-up over warmup_steps), weight_decay,
    grad_clip (max global gradient norm; 0 = off), ema_decay (with the warm-up
    min(ema_decay, (1 + n) / (10 + n)) so early EMA weights are not dominated by the initialisation),
    horizontal_flip (data augmentation; off for digits: a mirrored digit is another glyph), seed.
    """

    num_channels: int = option(32, "--num-channels", parse=int, help="base channels (a multiple of 32)")
    channel_mult: str = option("1,2", "--channel-mult", help="channel multiplier per resolution")
    num_res_blocks: int = option(1, "--num-res-blocks", parse=int, help="residual blocks per resolution")
    attention_resolutions: str = option("", "--attention-resolutions", default_text="'': the middle block only",
                                        help="feature-map sides with attention, comma-separated")
    num_head_channels: int = option(32, "--num-head-channels", parse=int, help="channels per attention head")
    dropout: float = option(0.0, "--dropout", parse=float, help="dropout in the residual blocks")
    use_scale_shift_norm: bool = option(True, help="FiLM-style timestep conditioning (ADM's default)")
    resblock_updown: bool = option(True, help="residual blocks for up- and down-sampling (ADM's default)")
    class_cond: bool = option(True, "--unconditional", action="store_false", help="no class conditioning")
    learn_sigma: bool = option(True, "--fixed-sigma", action="store_false",
                               help="no learned variance (MSE only; sample with beta~)")
    noise_schedule: str = option("cosine", "--noise-schedule", choices=NOISE_SCHEDULES, help="the diffusion's betas")
    diffusion_steps: int = option(1000, help="training diffusion steps T")
    steps: int = option(2000, "--steps", parse=int, help="optimisation steps")
    batch_size: int = option(64, "--batch-size", parse=int, help="images per optimisation step")
    lr: float = option(1e-3, "--lr", parse=float, help="AdamW learning rate")
    warmup_steps: int = option(100, "--warmup-steps", parse=int, help="linear learning-rate warm-up steps")
    weight_decay: float = option(0.0, "--weight-decay", parse=float, help="AdamW weight decay")
    grad_clip: float = option(1.0, "--grad-clip", parse=float, help="max global gradient norm (0 = off)")
    ema_decay: float = option(0.999, "--ema-decay", parse=float, help="EMA decay of the saved weights")
    horizontal_flip: bool = option(False, "--horizontal-flip", action="store_true",
                                   help="random horizontal flips while training")
    seed: int = option(0, "--seed", parse=int, help="initialisation and data-order seed")

    def __post_init__(self):
        for name in ("num_channels", "num_res_blocks", "steps", "batch_size", "diffusion_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise IGDSInputError(f"prior training {name} must be a positive integer, got {value!r}")
        if self.num_channels % 32:
            raise IGDSInputError(f"num_channels must be a multiple of 32 (GroupNorm(32)), got {self.num_channels}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise IGDSInputError(f"unknown noise schedule {self.noise_schedule!r}; expected one of {NOISE_SCHEDULES}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise IGDSInputError(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise IGDSInputError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise IGDSInputError("warmup_steps, grad_clip and weight_decay must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise IGDSInputError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def unet_flags(self, image_size: int, in_channels: int, num_classes: int) -> dict:
        """The `ADMUNet.from_flags` keyword flags of this architecture for a data set."""
        return dict(
            image_size=int(image_size),
            in_channels=int(in_channels),
            num_channels=self.num_channels,
            num_res_blocks=self.num_res_blocks,
            channel_mult=self.channel_mult,
            attention_resolutions=self.attention_resolutions,
            num_head_channels=self.num_head_channels,
            dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resblock_updown=self.resblock_updown,
            class_cond=self.class_cond,
            num_classes=int(num_classes),
            learn_sigma=self.learn_sigma,
        )

    def schedule_config(self) -> ScheduleConfig:
        """The training diffusion (no respacing: every one of the T steps is a table row)."""
        return ScheduleConfig(
            noise_schedule=self.noise_schedule,
            diffusion_steps=self.diffusion_steps,
            sampling_steps=str(self.diffusion_steps),
            # Only used when learn_sigma is off: beta~ (posterior variance) keeps few-step samples
            # from carrying the extra noise of the "large" choice.
            fixed_variance="small",
        )


@dataclass(frozen=True, kw_only=True)
class PriorTrainRun:
    """`igds-fast train-prior`: the data, the output file, the device; `training` is the PriorTrainConfig."""

    data: str | None = option(None, "--data", metavar="DIR", help="an ImageFolder: DIR/<class>/<image>")
    digits: bool = option(False, "--digits", action="store_true",
                          help="scikit-learn's digits instead (the train part of the fixed 70/30 split)")
    out: str = option(flag="--out", metavar="PRIOR.safetensors", help="the prior file to write (atomically)")
    image_size: int = option(16, "--image-size", parse=int, help="side the images are resized / centre-cropped to")
    channels: int | None = option(None, "--channels", parse=int, choices=(1, 3), default_text="3 for --data",
                                  help="1 = grayscale, 3 = RGB (--digits are grayscale)")
    device: str | None = option(None, "--device", default_text="cuda if available, else cpu", help="torch device")
    cpu_threads: int | None = option(None, "--cpu-threads", parse=int, metavar="N", default_text="1, so the bytes "
                                     "do not depend on the machine's core count", help="CPU runs: torch intra-op threads")
    training: PriorTrainConfig = section(PriorTrainConfig, "prior")

    def __post_init__(self):
        if (self.data is None) == (not self.digits):
            raise IGDSInputError("give --data DIR or --digits (one of them)")
        if self.digits and self.channels not in (None, 1):
            raise IGDSInputError(f"--channels {self.channels} applies to --data; scikit-learn's digits are grayscale "
                                 "(1 channel)")
        if not isinstance(self.out, str) or not self.out:
            raise IGDSInputError("give --out PRIOR.safetensors")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 4:
            raise IGDSInputError(f"--image-size must be an integer >= 4, got {self.image_size!r}")
        if self.image_size > HEADER_CAPS["image side"]:
            raise IGDSInputError(f"--image-size {self.image_size} is above {HEADER_CAPS['image side']} pixels")


# ---- losses ---------------------------------------------------------------------------------------


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of 8-bit images x in [-1, 1] under N(means, e^(2 log_scales)), bins of width 2/255 (nats).

    The outermost bins extend to +-infinity (Ho et al.'s decoder; guided-diffusion's losses.py).
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def diffusion_losses(
    unet, schedule: DiffusionSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, labels=None
) -> dict[str, torch.Tensor]:
    """Per-sample training losses [B]: {"mse", "vb" (learned sigma only), "loss"}.

    `schedule` must be the un-respaced training schedule (its row t is training timestep t), `t`
    [B] integer timesteps in [0, T). Equal to guided-diffusion's `GaussianDiffusion.training_losses`
    with ModelMeanType.EPSILON, LEARNED_RANGE variance and LossType.RESCALED_MSE (or MSE with a fixed
    variance).
    """
    if schedule.num_steps != schedule.config.diffusion_steps:
        raise IGDSInputError("diffusion_losses needs the un-respaced training schedule")
    ndim = x0.dim()
    x_t = schedule.q_sample(x0, t, noise)
    output = unet(x_t, t, labels)
    channels = x0.shape[1]
    eps, v = schedule.split_model_output(output, channels, bool(unet.learn_sigma))
    losses = {"mse": _mean_flat((noise - eps) ** 2)}
    if v is None:
        losses["loss"] = losses["mse"]
        return losses
    # The VB term trains only the variance: the mean it sees is built from a detached eps.
    x0_pred = schedule.predict_x0(x_t, eps.detach(), t, clip=False)
    model_mean = schedule.posterior_mean(x0_pred, x_t, t)
    model_log_var = schedule.log_variance(x_t, t, v)
    true_mean = schedule.posterior_mean(x0, x_t, t)
    true_log_var = schedule.gather(schedule.posterior_log_variance_clipped, t, ndim)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / LOG2
    decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / LOG2
    vb = torch.where(t == 0, decoder_nll, kl) * (schedule.config.diffusion_steps / 1000.0)
    losses["vb"] = vb
    losses["loss"] = losses["mse"] + vb
    return losses


# ---- training -------------------------------------------------------------------------------------


@dataclass
class PriorTrainReport:
    """What `train_prior` did: steps, wall time, and the loss curve (mean loss per logged window)."""

    steps: int
    wall_time_s: float
    samples_per_s: float
    final_loss: float
    final_mse: float
    loss_curve: list[tuple[int, float]]

    def to_dict(self) -> dict:
        return asdict(self)


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # Warm-up: early averages would otherwise keep most of the random initialisation.
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        self.updates += 1
        for shadow, live in zip(self.shadow.state_dict().values(), model.state_dict().values()):
            if shadow.dtype.is_floating_point:
                shadow.lerp_(live.detach(), 1.0 - decay)
            else:
                shadow.copy_(live)


def _check_fits_unet(images: torch.Tensor, config: PriorTrainConfig) -> None:
    """What the UNet needs of the images beyond a labelled set: square, a side it can halve at every level."""
    if images.shape[-1] != images.shape[-2]:
        raise IGDSInputError(f"training images must be square, got {tuple(images.shape[-2:])}")
    side = images.shape[-1]
    levels = len(config.channel_mult.split(","))
    if side % (2 ** (levels - 1)):
        raise IGDSInputError(f"image side {side} is not divisible by 2^{levels - 1} (channel_mult {config.channel_mult!r})")


def train_prior(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    config: PriorTrainConfig = PriorTrainConfig(),
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    log_every: int = 100,
) -> tuple[ADMUNet, ScheduleConfig, PriorTrainReport]:
    """Train a prior on images [N, C, S, S] in [-1, 1] with labels [N] (index into class_names).

    Returns (EMA UNet in eval mode, training ScheduleConfig, report). `progress(step, steps, loss)`
    is called every `log_every` steps. Deterministic for a seed on one device and thread count.
    """
    # A class-conditional prior needs images of every class: a class without any would keep an
    # untrained embedding and sample noise.
    labels, class_names = check_labelled_images(
        images, labels, class_names, what="training", channels=(1, 3), channels_expected_by="the prior's UNet",
        require_every_class=config.class_cond,
    )
    _check_fits_unet(images, config)
    device = resolve_device(device)
    flags = config.unet_flags(images.shape[-1], images.shape[1], len(class_names))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = ADMUNet.from_flags(**flags)
    unet = unet.to(device).train()
    schedule = DiffusionSchedule(config.schedule_config(), device=device)
    ema = EMA(unet, config.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    data = images.to(device, torch.float32)
    targets = labels.to(device)
    count = data.shape[0]
    order, cursor = torch.randperm(count, generator=generator), 0
    curve, window, window_mse = [], [], []
    last_loss = last_mse = float("nan")
    start = time.perf_counter()
    for step in range(config.steps):
        # Epoch-style batches (every image once per pass) in a seeded order.
        if cursor + config.batch_size > count:
            order, cursor = torch.randperm(count, generator=generator), 0
        index = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        x0 = data[index.to(device)]
        if config.horizontal_flip:
            flip = (torch.rand(x0.shape[0], generator=generator) < 0.5).to(device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, config.diffusion_steps, (x0.shape[0],), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        y = targets[index.to(device)] if config.class_cond else None
        losses = diffusion_losses(unet, schedule, x0, t, noise, y)
        loss = losses["loss"].mean()
        if not torch.isfinite(loss):
            raise IGDSInputError(f"prior training diverged at step {step} (loss {float(loss)}); lower lr")
        if config.warmup_steps:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        optimizer.step()
        ema.update(unet)
        window.append(float(loss.detach()))
        window_mse.append(float(losses["mse"].detach().mean()))
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            last_loss, last_mse = float(np.mean(window)), float(np.mean(window_mse))
            curve.append((step + 1, last_loss))
            window, window_mse = [], []
            if progress is not None:
                progress(step + 1, config.steps, last_loss)
    wall = time.perf_counter() - start
    report = PriorTrainReport(
        steps=config.steps,
        wall_time_s=wall,
        samples_per_s=config.steps * config.batch_size / max(wall, 1e-9),
        final_loss=last_loss,
        final_mse=last_mse,
        loss_curve=curve,
    )
    return ema.shadow.eval(), config.schedule_config(), report
