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
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .artifacts import parse_json_header
from .diffusion import NOISE_SCHEDULES, DiffusionSchedule, ScheduleConfig
from .errors import IGDSInputError
from .imageio import write_bytes_atomic
from .models.adm import ADMUNet, check_state_dict

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

    num_channels: int = 32
    channel_mult: str = "1,2"
    num_res_blocks: int = 1
    attention_resolutions: str = ""
    num_head_channels: int = 32
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    class_cond: bool = True
    learn_sigma: bool = True
    noise_schedule: str = "cosine"
    diffusion_steps: int = 1000
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    horizontal_flip: bool = False
    seed: int = 0

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
    abar = schedule.gather(schedule.alphas_cumprod, t, ndim)
    x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
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


def _check_training_data(images, labels, class_names, config: PriorTrainConfig):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise IGDSInputError(f"training images must be a float [N, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    if images.shape[0] == 0:
        raise IGDSInputError("no training images")
    if images.shape[-1] != images.shape[-2]:
        raise IGDSInputError(f"training images must be square, got {tuple(images.shape[-2:])}")
    if images.shape[1] not in (1, 3):
        raise IGDSInputError(f"training images must have 1 or 3 channels, got {images.shape[1]}")
    if float(images.min()) < -1.0 - 1e-4 or float(images.max()) > 1.0 + 1e-4:
        raise IGDSInputError("training images must lie in [-1, 1]")
    labels = torch.as_tensor(labels)
    if labels.shape != (images.shape[0],) or labels.dtype.is_floating_point:
        raise IGDSInputError(f"labels must be an integer [{images.shape[0]}] tensor")
    class_names = [str(name) for name in class_names]
    if not class_names or len(set(class_names)) != len(class_names):
        raise IGDSInputError("class_names must be a non-empty list of distinct names")
    if int(labels.min()) < 0 or int(labels.max()) >= len(class_names):
        raise IGDSInputError(f"labels must lie in [0, {len(class_names)})")
    side = images.shape[-1]
    levels = len(config.channel_mult.split(","))
    if side % (2 ** (levels - 1)):
        raise IGDSInputError(f"image side {side} is not divisible by 2^{levels - 1} (channel_mult {config.channel_mult!r})")
    return labels.long(), class_names


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
    labels, class_names = _check_training_data(images, labels, class_names, config)
    device = torch.device(device)
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


# ---- artifact -------------------------------------------------------------------------------------


def save_prior(
    path: str | os.PathLike,
    unet: ADMUNet,
    flags: dict,
    schedule_config: ScheduleConfig,
    class_names: Sequence[str],
    training: dict | None = None,
) -> None:
    """Write the prior as one safetensors file (weights + `igds_prior` JSON header), atomically."""
    from safetensors.torch import save

    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "flags": dict(flags),
        "diffusion": {
            "noise_schedule": schedule_config.noise_schedule,
            "diffusion_steps": schedule_config.diffusion_steps,
            "fixed_variance": schedule_config.fixed_variance,
        },
        "class_names": [str(name) for name in class_names],
        "training": training or {},
    }
    # clone(): safetensors refuses tensors sharing storage.
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in unet.state_dict().items()}
    data = save(tensors, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})
    write_bytes_atomic(path, data)


def read_prior_header(path: str | os.PathLike) -> dict:
    """The validated JSON header of a prior file (no tensors read): one-line errors for any defect."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise IGDSInputError(f"prior file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for every format defect
        raise IGDSInputError(f"{path} is not a readable safetensors file: {' '.join(str(exc).split())[:200]}") from exc
    header = parse_json_header(metadata, path, METADATA_KEY, FORMAT_NAME, FORMAT_VERSION, "prior")
    for key in ("flags", "diffusion", "class_names"):
        if key not in header:
            raise IGDSInputError(f"{path}: prior header lacks {key!r}")
    return header


def is_prior_file(path: str | os.PathLike) -> bool:
    """True when `path` is a safetensors file carrying an `igds_prior` header."""
    try:
        read_prior_header(path)
    except IGDSInputError:
        return False
    return True


def load_prior(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ADMUNet, ScheduleConfig, list[str]]:
    """(EMA UNet in eval mode on `device`, training ScheduleConfig, class names) from a prior file.

    The ScheduleConfig has sampling_steps = diffusion_steps; respace with `dataclasses.replace`.
    """
    from safetensors.torch import load_file

    path = os.fspath(path)
    header = read_prior_header(path)
    try:
        unet = ADMUNet.from_flags(**header["flags"])
        diffusion = header["diffusion"]
        schedule_config = ScheduleConfig(
            noise_schedule=diffusion["noise_schedule"],
            diffusion_steps=int(diffusion["diffusion_steps"]),
            sampling_steps=str(int(diffusion["diffusion_steps"])),
            fixed_variance=diffusion.get("fixed_variance", "small"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IGDSInputError(f"{path}: bad prior header ({type(exc).__name__}: {exc})") from exc
    except IGDSInputError as exc:
        raise IGDSInputError(f"{path}: {exc}") from exc
    class_names = [str(name) for name in header["class_names"]]
    if unet.num_classes is not None and unet.num_classes != len(class_names):
        raise IGDSInputError(f"{path}: the UNet has {unet.num_classes} classes but the header names {len(class_names)}")
    state = load_file(path)
    check_state_dict(unet, state, f"prior {path}")
    unet.load_state_dict(state)
    return unet.to(device).eval(), schedule_config, class_names


# ---- command line ---------------------------------------------------------------------------------


def add_train_prior_parser(subparsers) -> None:
    """Declare `igds-fast train-prior` (sets handler=run_train_prior)."""
    defaults = PriorTrainConfig()
    parser = subparsers.add_parser(
        "train-prior",
        help="train a small ADM DDPM prior on an image folder (or the built-in digits)",
        description=(
            "Train an ADM-architecture DDPM (eps-prediction MSE + the hybrid VB term for the learned "
            "variance, AdamW, EMA) and save it as one safetensors file usable as `distill --prior FILE`."
        ),
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="DIR", help="ImageFolder: DIR/<class>/<image>")
    data.add_argument("--digits", action="store_true", help="scikit-learn's digits (fixed 70/30 split, train part)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--image-size", type=int, default=16, help="side the images are resized/cropped to (default: 16)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 = grayscale, 3 = RGB (default: 3; digits: 1)")
    for name, kind in (("num_channels", int), ("channel_mult", str), ("num_res_blocks", int),
                       ("attention_resolutions", str), ("num_head_channels", int), ("dropout", float),
                       ("noise_schedule", str), ("steps", int), ("batch_size", int), ("lr", float),
                       ("warmup_steps", int), ("weight_decay", float), ("grad_clip", float), ("ema_decay", float),
                       ("seed", int)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                            help=f"(default: {getattr(defaults, name)!r})")
    parser.add_argument("--fixed-sigma", action="store_true", help="no learned variance (MSE only; sample with beta~)")
    parser.add_argument("--unconditional", action="store_true", help="no class conditioning")
    parser.add_argument("--horizontal-flip", action="store_true", help="random horizontal flips while training")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(handler=run_train_prior)


def run_train_prior(args) -> int:
    """The `train-prior` subcommand: load data, train, save atomically; returns the exit code."""
    import sys

    out_folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_folder):
        raise IGDSInputError(f"output folder {out_folder!r} does not exist")
    config = PriorTrainConfig(
        num_channels=args.num_channels, channel_mult=args.channel_mult, num_res_blocks=args.num_res_blocks,
        attention_resolutions=args.attention_resolutions, num_head_channels=args.num_head_channels,
        dropout=args.dropout, class_cond=not args.unconditional, learn_sigma=not args.fixed_sigma,
        noise_schedule=args.noise_schedule, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, horizontal_flip=args.horizontal_flip, seed=args.seed,
    )
    if args.digits:
        from .data import load_digits_split

        images, labels, _, _ = load_digits_split(image_size=args.image_size)
        class_names = [str(digit) for digit in range(10)]
    else:
        from .data import load_image_folder

        images, labels, class_names, _ = load_image_folder(args.data, args.image_size, channels=args.channels)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def progress(step, steps, loss):
        print(f"train-prior: step {step}/{steps} loss {loss:.4f}", file=sys.stderr, flush=True)

    unet, schedule_config, report = train_prior(images, labels, class_names, config, device=device, progress=progress)
    flags = config.unet_flags(images.shape[-1], images.shape[1], len(class_names))
    save_prior(args.out, unet, flags, schedule_config, class_names,
               {"config": asdict(config), "report": report.to_dict()})
    print(f"train-prior: {report.steps} steps in {report.wall_time_s:.1f}s (final loss {report.final_loss:.4f}); "
          f"wrote {args.out}")
    return 0
