"""diffusers priors: a `UNet2DModel` behind the ADMUNet call interface, sampled as its scheduler config says.

    spec = read_scheduler_config("path/to/pipeline")    # a pipeline root, a flat folder or a unet folder
    unet = load_diffusers_unet("path/to/pipeline", prediction_type=spec.prediction_type, ...)
    eps_and_v = unet(x [B, C, H, W], timesteps [B], y [B] or None)   -> [B, C or 2C, H, W]

Attributes match ADMUNet's: image_size, in_channels, out_channels, learn_sigma (out = 2 x in),
num_classes (the config's num_class_embeds, None when unconditional). The sampler works on eps: a
v_prediction or sample (x0) model's output is turned into eps here, from the training schedule's
alpha-bar at the given timesteps (in float32, whatever the copy's dtype).

Layouts: a pipeline root (`unet/config.json` + `scheduler/scheduler_config.json`, what a pipeline's
save_pretrained writes), a flat folder (`config.json`, the weights and `scheduler_config.json` side by
side: the layout of the public `google/ddpm-cifar10-32` and `google/ddpm-*-256` models), or a bare UNet
folder (its scheduler, if any, in `../scheduler/`).

The scheduler config gives the training diffusion: num_train_timesteps, beta_schedule (linear, scaled_linear,
squaredcos_cap_v2) with beta_start / beta_end, prediction_type, variance_type (fixed_small,
fixed_small_log, fixed_large, fixed_large_log, learned_range) and clip_sample. What the sampler does
not implement is refused in one line: learned (a direct log variance), trained_betas, thresholding,
rescale_betas_zero_snr, clip_sample_range other than 1. The inference-side settings
(timestep_spacing, steps_offset, num_inference_steps) are not read: the steps are the sampler's own
respacing (guided-diffusion's space_timesteps, `--timestep-respacing`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..artifacts import check_finite_weights
from ..diffusion import named_betas
from ..errors import IGDSInputError
from ..limits import header_int, read_json

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
VARIANCE_TYPES = {"fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large",
                  "fixed_large_log": "large", "learned_range": None}


@dataclass(frozen=True)
class SchedulerSpec:
    """What a diffusers scheduler config says about the training diffusion (ScheduleConfig fields + more).

    schedule: ScheduleConfig fields except sampling_steps; prediction_type; learned_range: the UNet
    outputs a learned-range variance (variance_type learned_range); clip_sample: clip the x0
    prediction to [-1, 1]; source: the config file read (None: none found, guided-diffusion defaults).
    """

    schedule: dict
    prediction_type: str = "epsilon"
    learned_range: bool = False
    clip_sample: bool = True
    source: str | None = None


def unet_folder(directory: str | os.PathLike) -> str:
    """The UNet folder of a pipeline root (unet/config.json) or a UNet folder itself (config.json)."""
    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, "unet", "config.json")):
        return os.path.join(directory, "unet")
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    raise IGDSInputError(f"not a diffusers UNet folder or pipeline root (no config.json, no unet/config.json): {directory}")


def scheduler_config_path(directory: str | os.PathLike) -> str | None:
    """The scheduler config of a diffusers folder, or None when it has none.

    In the folder: scheduler/scheduler_config.json (a pipeline root) or scheduler_config.json (a flat
    folder, as google/ddpm-cifar10-32); both there is ambiguous and refused. Else beside it:
    ../scheduler/scheduler_config.json (a UNet folder inside a pipeline root).
    """
    directory = os.path.abspath(os.fspath(directory))
    inside = [path for path in (os.path.join(directory, "scheduler", "scheduler_config.json"),
                                os.path.join(directory, "scheduler_config.json")) if os.path.isfile(path)]
    if len(inside) > 1:
        raise IGDSInputError(f"{directory} has two scheduler configs ({inside[0]} and {inside[1]}): keep the one "
                             "the UNet was trained with")
    if inside:
        return inside[0]
    beside = os.path.join(os.path.dirname(directory), "scheduler", "scheduler_config.json")
    return beside if os.path.isfile(beside) else None


def read_scheduler_config(directory: str | os.PathLike, noise_schedule: str = "linear") -> SchedulerSpec:
    """The training diffusion of a diffusers pipeline root, flat folder or UNet folder, from its scheduler config.

    Where the config is looked for: `scheduler_config_path`. Without one: `noise_schedule` over 1000
    steps, eps prediction, fixed large variance, clipping — guided-diffusion's defaults, as a bare UNet
    folder records nothing else.
    """
    path = scheduler_config_path(directory)
    if path is None:
        return SchedulerSpec({"noise_schedule": noise_schedule, "diffusion_steps": 1000, "fixed_variance": "large"})
    config = read_json(path, "scheduler config")
    if not isinstance(config, dict):
        raise IGDSInputError(f"{path} is not a scheduler config (a JSON object)")
    if "timesteps" in config and "num_train_timesteps" not in config:
        # diffusers 0.0.x's GaussianDDPMScheduler (an early revision of google/ddpm-cifar10-32): its
        # keys are not today's, and a key read under another name would silently become a default.
        raise IGDSInputError(f"{path} is a pre-0.1 diffusers scheduler config (timesteps, no num_train_timesteps): "
                             "use the model's current revision")

    def refuse(what):
        raise IGDSInputError(f"{path}: {what} is not implemented by the sampler (it would sample another model)")

    if config.get("trained_betas") is not None:
        refuse("trained_betas")
    if config.get("thresholding"):
        refuse("thresholding")
    if config.get("rescale_betas_zero_snr"):
        refuse("rescale_betas_zero_snr")
    schedule_name = config.get("beta_schedule", "linear")
    if schedule_name not in BETA_SCHEDULES:
        refuse(f"beta_schedule {schedule_name!r} (known: {', '.join(BETA_SCHEDULES)})")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        refuse(f"prediction_type {prediction!r}")
    variance = config.get("variance_type", "fixed_small")
    if variance not in VARIANCE_TYPES:
        refuse(f"variance_type {variance!r}")
    clip = bool(config.get("clip_sample", True))
    if clip and float(config.get("clip_sample_range", 1.0)) != 1.0:
        refuse(f"clip_sample_range {config.get('clip_sample_range')!r} (only 1.0)")
    schedule = {
        "noise_schedule": BETA_SCHEDULES[schedule_name],
        "diffusion_steps": header_int(config.get("num_train_timesteps", 1000), "num_train_timesteps", "diffusion steps",
                                      f"scheduler config {path}", minimum=2),
        "fixed_variance": VARIANCE_TYPES[variance] or "large",
    }
    if schedule["noise_schedule"] != "cosine":
        schedule.update(beta_start=float(config.get("beta_start", 0.0001)), beta_end=float(config.get("beta_end", 0.02)))
    return SchedulerSpec(schedule, prediction, variance == "learned_range", clip, path)


class DiffusersUNetPrior(nn.Module):
    """Wraps a diffusers UNet2DModel: forward(x, timesteps, y) -> eps (and v) [B, C or 2C, H, W].

    prediction_type: what the model predicts ("epsilon", "v_prediction", "sample"); for the last two,
    alphas_cumprod [T] (the training schedule's) turns the prediction into eps.
    """

    # Kept in float32 in a low-precision copy (sampling/compiled/low_precision.py): the eps
    # conversion needs the schedule's precision, not the weights'.
    low_precision_keep = ("alphas_cumprod",)

    def __init__(self, model, prediction_type: str = "epsilon", alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise IGDSInputError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type != "epsilon" and alphas_cumprod is None:
            raise IGDSInputError(f"a {prediction_type} prior needs the training schedule's alphas_cumprod")
        self.model = model
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", None if alphas_cumprod is None else alphas_cumprod.float())
        config = model.config
        size = config.sample_size
        sizes = [size] if isinstance(size, int) else list(size or [])
        if not sizes or any(s != sizes[0] for s in sizes):
            # The sampler draws square noise of image_size; nothing else can be inferred safely.
            raise IGDSInputError(f"diffusers UNet config needs a square sample_size, got {size!r}")
        self.image_size = int(sizes[0])
        self.in_channels = int(config.in_channels)
        self.out_channels = int(config.out_channels)
        self.learn_sigma = self.out_channels == 2 * self.in_channels
        classes = getattr(config, "num_class_embeds", None)
        self.num_classes = int(classes) if classes else None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in, H, W], timesteps [B] (original training steps), y [B] or None -> [B, out, H, W]."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2:] != (self.image_size, self.image_size):
            raise IGDSInputError(
                f"diffusers UNet expects [B, {self.in_channels}, {self.image_size}, {self.image_size}] images, "
                f"got {tuple(x.shape)}"
            )
        if (y is None) != (self.num_classes is None):
            raise IGDSInputError(
                "class labels are required by a class-conditional UNet" if y is None
                else "labels given to an unconditional UNet"
            )
        output = self.model(x, timesteps, class_labels=y, return_dict=False)[0]
        if self.prediction_type == "epsilon":
            return output
        abar = self.alphas_cumprod.index_select(0, timesteps.long()).reshape(-1, 1, 1, 1)
        prediction, rest = output[:, : self.in_channels], output[:, self.in_channels:]
        x = x.float()
        if self.prediction_type == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) x0
            eps = abar.sqrt() * prediction.float() + (1.0 - abar).sqrt() * x
        else:  # the x0 prediction itself
            eps = (x - abar.sqrt() * prediction.float()) / (1.0 - abar).sqrt()
        return torch.cat([eps.to(output.dtype), rest], dim=1) if rest.shape[1] else eps.to(output.dtype)


def load_diffusers_unet(directory: str | os.PathLike, device="cpu", prediction_type: str = "epsilon",
                        schedule: dict | None = None) -> DiffusersUNetPrior:
    """Load a UNet2DModel from a local save_pretrained() folder or pipeline root (eval mode); nothing is downloaded.

    prediction_type / schedule: from `read_scheduler_config` (the schedule's ScheduleConfig fields give
    the alphas_cumprod a v_prediction or sample model needs). diffusers is imported here, so it is
    only needed by users of this loader.
    :raises IGDSInputError: (one line) diffusers missing, no config.json, or an unloadable folder.
    """
    directory = unet_folder(directory)
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise IGDSInputError("diffusers is not installed: pip install diffusers") from None
    try:
        model = UNet2DModel.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # noqa: BLE001 — any unreadable folder is one input error
        raise IGDSInputError(f"cannot load a UNet2DModel from {directory}: {type(error).__name__}: {error}") from None
    check_finite_weights(model.state_dict(), f"diffusers UNet {directory}")
    alphas_cumprod = None
    if prediction_type != "epsilon":
        fields = dict(schedule or {})
        betas = named_betas(fields.get("noise_schedule", "linear"), int(fields.get("diffusion_steps", 1000)),
                            fields.get("beta_start"), fields.get("beta_end"))
        alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float64)
    return DiffusersUNetPrior(model, prediction_type, alphas_cumprod).to(device).eval()


__all__ = ["DiffusersUNetPrior", "SchedulerSpec", "load_diffusers_unet", "read_scheduler_config",
           "scheduler_config_path", "unet_folder"]
