"""Priors on disk: describing, loading and saving them (ADM checkpoints, diffusers folders, our files).

Four kinds: a guided-diffusion ADM checkpoint (`256x256_diffusion.pt` with its preset), a DiT or
MinimaxDiffusion checkpoint (`DiT-XL-2-256x256.pt`, a latent prior: recognised by its keys, its size
read off its tensor shapes or given by a dit-* preset), a diffusers `UNet2DModel` folder (a pipeline
root, or flat as `google/ddpm-cifar10-32`; given as --diffusers or as --prior), and a prior
trained by `igds-fast train-prior` — ours: one safetensors file
with the EMA weights (ADMUNet state-dict keys) and a JSON header under the metadata key
`igds_prior` holding the create_model flags, the diffusion (ScheduleConfig) fields, the class names
and the training settings. `describe_prior` identifies any of them from its header only (class
list, diffusion, fingerprint); `load_prior_unet` then loads the weights.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from safetensors.torch import load_file, save

from ..artifacts import check_finite_weights, check_torch_archive, file_fingerprint, folder_fingerprint, parse_json_header, read_safetensors
from ..classes import imagenet_wnids
from ..diffusion import ScheduleConfig
from ..errors import IGDSInputError
from ..limits import HEADER_CAPS, check_class_name, header_int, read_json
from ..imageio import write_bytes_atomic
from .adm import ADM_DIFFUSION_FLAGS, ADM_PRESETS, ADMUNet, check_state_dict, load_adm
from .diffusers_unet import load_diffusers_unet, read_scheduler_config, unet_folder
from .dit import DIT_PRESETS, describe_dit_checkpoint, is_dit_checkpoint, load_dit

PRIOR_KINDS = ("adm", "dit", "igds")
FORMAT_NAME = "igds_prior"
FORMAT_VERSION = 1
METADATA_KEY = "igds_prior"


def save_prior(
    path: str | os.PathLike,
    unet: ADMUNet,
    flags: dict,
    schedule_config: ScheduleConfig,
    class_names: Sequence[str],
    training: dict | None = None,
) -> None:
    """Write the prior as one safetensors file (weights + `igds_prior` JSON header), atomically."""
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
    path = os.fspath(path)
    metadata, _ = read_safetensors(path, "prior file")
    header = parse_json_header(metadata, path, METADATA_KEY, FORMAT_NAME, FORMAT_VERSION, "prior")
    for key in ("flags", "diffusion", "class_names"):
        if key not in header:
            raise IGDSInputError(f"{path}: prior header lacks {key!r}")
    flags, diffusion, names = header["flags"], header["diffusion"], header["class_names"]
    if not isinstance(flags, dict) or not isinstance(diffusion, dict) or not isinstance(names, list):
        raise IGDSInputError(f"{path}: prior header's flags and diffusion must be objects, class_names a list")
    # The sizes a model is built from, bounded before anything is built or allocated.
    source = f"prior {path}"
    header_int(flags.get("image_size"), "image_size", "image side", source)
    header_int(flags.get("in_channels", 3), "in_channels", "image channels", source)
    header_int(flags.get("num_classes", 1000), "num_classes", "classes", source)
    header_int(diffusion.get("diffusion_steps"), "diffusion_steps", "diffusion steps", source, minimum=2)
    header_int(flags.get("num_channels"), "num_channels", "model channels", source)
    header_int(flags.get("num_res_blocks"), "num_res_blocks", "blocks per level", source)
    mult = flags.get("channel_mult") or ""
    levels = len(str(mult).split(",")) if isinstance(mult, str) else len(mult) if isinstance(mult, (list, tuple)) else 0
    if levels > HEADER_CAPS["levels"]:
        raise IGDSInputError(f"{source}: channel_mult has {levels} levels, more than {HEADER_CAPS['levels']}")
    if len(names) > HEADER_CAPS["classes"]:
        raise IGDSInputError(f"{source}: {len(names)} class names, more than {HEADER_CAPS['classes']}")
    for name in names:
        check_class_name(name, f"{source}: class")
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
    check_finite_weights(state, f"prior {path}")
    unet.load_state_dict(state)
    return unet.to(device).eval(), schedule_config, class_names


@dataclass
class PriorSpec:
    """What is known about a prior before its weights are loaded (for validation and the config)."""

    kind: str  # "adm" | "igds" | "diffusers" | "dit"
    path: str
    preset: str | None
    class_names: list[str] | None  # None = unconditional
    schedule: dict  # ScheduleConfig fields except sampling_steps
    fingerprint: dict
    prediction_type: str = "epsilon"  # diffusers priors: what the UNet predicts (turned into eps on load)
    clip_x0: bool = True  # the x0 clipping the prior was sampled with (diffusers' clip_sample)
    flags: dict | None = None  # DiT priors: the DiT constructor's arguments (preset, or read off the shapes)
    learn_sigma: bool = False  # the UNet outputs its variance (learned range); else schedule["fixed_variance"]

    @property
    def variance(self) -> str:
        """The reverse-step variance the sampler uses with this prior: "learned_range", "fixed_large" or
        "fixed_small" (a learned-range prior ignores the schedule's fixed_variance)."""
        return "learned_range" if self.learn_sigma else f"fixed_{self.schedule['fixed_variance']}"

    @property
    def latent(self) -> bool:
        """The prior samples latents that a VAE decodes (DiT)."""
        return self.kind == "dit"


def describe_prior(prior: str | None, preset: str | None, diffusers: str | None, ve_class_names: list[str],
                   noise_schedule: str | None = None, prior_class_names: list[str] | None = None,
                   prior_kind: str | None = None) -> PriorSpec:
    """Identify a prior, its class list and diffusion without loading its weights (one-line errors).

    Exactly one of prior (an ADM checkpoint with its `preset`, a DiT checkpoint, a file written by
    train-prior, or a diffusers folder) and diffusers (a diffusers folder). A diffusers folder is a
    pipeline root with unet/ and scheduler/, a flat folder (config.json, weights and
    scheduler_config.json side by side, as google/ddpm-cifar10-32) or a UNet2DModel folder; its
    diffusion comes from the scheduler config, or `noise_schedule` (default linear) when there is
    none; its class list is ImageNet-1K's for 1000 classes, the VE's for as many classes as the VE,
    else `prior_class_names`; unconditional (None) without class embeddings. prior_kind: "adm" /
    "dit" / "igds" to say what a --prior file is (None = from the preset, the header or the keys).
    """
    if prior_kind is not None and prior_kind not in PRIOR_KINDS:
        raise IGDSInputError(f"unknown prior kind {prior_kind!r}; expected one of {PRIOR_KINDS}")
    given = [name for name, value in (("--prior", prior), ("--diffusers", diffusers)) if value]
    if len(given) != 1:
        raise IGDSInputError("give exactly one prior: --prior PATH [--arch NAME] or --diffusers DIR")
    if prior and os.path.isdir(prior):
        # A folder given as --prior: only a diffusers folder is one (every other kind is a single file);
        # unet_folder below refuses any other folder in one line naming it.
        prior, diffusers = None, prior
    elif prior and noise_schedule is not None:
        raise IGDSInputError("--noise-schedule applies to diffusers folders only (a --prior file brings its diffusion)")
    if diffusers:
        directory = unet_folder(os.path.abspath(diffusers))
        config_path = os.path.join(directory, "config.json")
        if preset:
            raise IGDSInputError("--arch applies to checkpoint files, not to diffusers folders")
        if prior_kind is not None:
            raise IGDSInputError("--prior-kind applies to checkpoint files, not to diffusers folders")
        unet_config = read_json(config_path, "diffusers config")
        if not isinstance(unet_config, dict):
            raise IGDSInputError(f"{config_path} is not a diffusers config (a JSON object)")
        source = f"diffusers config {config_path}"
        sample_size = unet_config.get("sample_size")
        for value in (sample_size if isinstance(sample_size, (list, tuple)) else [sample_size]):
            if value is not None:
                header_int(value, "sample_size", "image side", source)
        for field in ("in_channels", "out_channels"):
            if unet_config.get(field) is not None:
                header_int(unet_config[field], field, "image channels", source)
        num_classes = unet_config.get("num_class_embeds")
        if num_classes is not None:
            header_int(num_classes, "num_class_embeds", "classes", source)
        if prior_class_names is not None:
            class_names = list(prior_class_names)
        elif not num_classes:
            class_names = None
        elif int(num_classes) == 1000:
            class_names = imagenet_wnids()
        elif int(num_classes) == len(ve_class_names):
            class_names = list(ve_class_names)  # a prior trained on the VE's own classes, same order
        else:
            raise IGDSInputError(
                f"the diffusers prior has {num_classes} classes, neither ImageNet-1K's 1000 nor the VE's "
                f"{len(ve_class_names)}: its class list is unknown"
            )
        scheduler = read_scheduler_config(os.path.abspath(diffusers), noise_schedule or "linear")
        if scheduler.source is not None and noise_schedule is not None:
            raise IGDSInputError(f"{scheduler.source} sets the noise schedule: drop --noise-schedule")
        out, channels = int(unet_config.get("out_channels", 0)), int(unet_config.get("in_channels", 0))
        if scheduler.source is not None and scheduler.learned_range != (out == 2 * channels):
            raise IGDSInputError(
                f"{scheduler.source}: variance_type {'learned_range' if scheduler.learned_range else 'fixed'} does not "
                f"fit a UNet with {out} output channels for {channels} input channels"
            )
        fingerprint = folder_fingerprint(directory)
        if scheduler.source is not None:
            fingerprint["scheduler_config.json"] = file_fingerprint(scheduler.source)
        return PriorSpec("diffusers", directory, None, class_names, scheduler.schedule, fingerprint,
                         scheduler.prediction_type, scheduler.clip_sample, learn_sigma=out == 2 * channels)

    return describe_prior_file(prior, preset, prior_kind, ve_class_names, prior_class_names)


def describe_prior_file(prior: str, preset: str | None, prior_kind: str | None = None,
                        ve_class_names: list[str] | None = None, prior_class_names: list[str] | None = None) -> PriorSpec:
    """A --prior file: an ADM checkpoint (with its preset), a DiT checkpoint or a prior written by train-prior."""
    path = os.path.abspath(prior)
    if not os.path.isfile(path):
        raise IGDSInputError(f"prior checkpoint not found: {prior}")
    dit = prior_kind == "dit" or preset in DIT_PRESETS
    if preset and prior_kind is not None and (prior_kind == "dit") != (preset in DIT_PRESETS):
        raise IGDSInputError(f"--arch {preset} is not a {prior_kind} preset")
    if not dit and not preset and prior_kind is None and not is_prior_file(path):
        dit = is_dit_checkpoint(path)  # read off the checkpoint's keys
    if dit:
        return _describe_dit(path, preset, ve_class_names, prior_class_names)
    if prior_kind == "adm" and not preset:
        raise IGDSInputError(f"an ADM checkpoint needs its --arch ({', '.join(sorted(ADM_PRESETS))})")
    if preset:
        if preset not in ADM_PRESETS:
            raise IGDSInputError(f"unknown ADM preset {preset!r}; available: {', '.join(sorted(ADM_PRESETS))}")
        flags = ADM_PRESETS[preset]
        if not path.endswith(".safetensors"):
            check_torch_archive(path, "ADM checkpoint")  # now, not when the sampler loads it
        class_names = imagenet_wnids() if flags.get("class_cond") else None
        schedule = {**ADM_DIFFUSION_FLAGS[preset], "fixed_variance": "large"}
        return PriorSpec("adm", path, preset, class_names, schedule, file_fingerprint(path),
                         learn_sigma=bool(flags.get("learn_sigma")))

    try:
        header = read_prior_header(path)
    except IGDSInputError as exc:
        raise IGDSInputError(
            f"{exc}; for a guided-diffusion checkpoint pass --arch ({', '.join(sorted(ADM_PRESETS))})"
        ) from None
    if prior_kind not in (None, "igds"):
        raise IGDSInputError(f"{path} is a prior file of igds-fast train-prior, not a {prior_kind} checkpoint")
    class_names = [str(name) for name in header["class_names"]] if header["flags"].get("class_cond") else None
    schedule = {
        "noise_schedule": header["diffusion"]["noise_schedule"],
        "diffusion_steps": int(header["diffusion"]["diffusion_steps"]),
        "fixed_variance": header["diffusion"].get("fixed_variance", "small"),
    }
    return PriorSpec("igds", path, None, class_names, schedule, file_fingerprint(path),
                     learn_sigma=bool(header["flags"].get("learn_sigma")))


def _describe_dit(path: str, preset: str | None, ve_class_names: list[str] | None,
                  prior_class_names: list[str] | None) -> PriorSpec:
    """A DiT / MinimaxDiffusion checkpoint: its flags (checked against its keys), class list, diffusion.

    Classes: ImageNet-1K's sorted wnids for 1000 classes (DiT's and MinimaxDiffusion's labels are the
    index in that list), the VE's for as many classes as the VE, else `prior_class_names`. The
    diffusion is DiT's create_diffusion: 1000 linear betas, learned-range variance, eps prediction,
    and no x0 clipping (its sample.py passes clip_denoised=False).
    """
    flags = describe_dit_checkpoint(path, preset)
    classes = int(flags["num_classes"])
    if prior_class_names is not None:
        if len(prior_class_names) != classes:
            raise IGDSInputError(f"the DiT has {classes} classes but {len(prior_class_names)} class names were given")
        class_names = list(prior_class_names)
    elif classes == 1000:
        class_names = imagenet_wnids()
    elif ve_class_names is not None and classes == len(ve_class_names):
        class_names = list(ve_class_names)
    else:
        raise IGDSInputError(f"the DiT has {classes} classes, neither ImageNet-1K's 1000 nor the VE's: "
                             "its class list is unknown")
    schedule = {"noise_schedule": "linear", "diffusion_steps": 1000, "fixed_variance": "large"}
    return PriorSpec("dit", path, preset, class_names, schedule, file_fingerprint(path), clip_x0=False, flags=flags,
                     learn_sigma=bool(flags.get("learn_sigma", True)))


def declared_size(spec: PriorSpec) -> tuple[int, tuple[int, int, int]]:
    """(parameters, [C, S, S] of one sample) of the prior `spec` describes, without reading a weight.

    ADM presets and our prior files: the ADMUNet built on the meta device from the preset's / header's
    flags; a DiT: the DiT of its flags on the meta device (its latent sample); a diffusers folder: its
    config's sample size and channels, and its weight files' bytes / 4 (a lower bound for fp16 files).
    """
    if spec.kind in ("adm", "igds"):
        flags = ADM_PRESETS[spec.preset] if spec.kind == "adm" else read_prior_header(spec.path)["flags"]
        try:
            with torch.device("meta"):
                unet = ADMUNet.from_flags(**flags)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise IGDSInputError(f"{spec.path}: bad prior flags ({type(exc).__name__}: {exc})") from exc
        parameters = sum(p.numel() for p in unet.parameters())
        return parameters, (unet.in_channels, unet.image_size, unet.image_size)
    if spec.kind == "dit":
        from .dit import DiT

        with torch.device("meta"):
            dit = DiT(**spec.flags)
        side = int(spec.flags["input_size"])
        return sum(p.numel() for p in dit.parameters()), (int(spec.flags["in_channels"]), side, side)
    config = read_json(os.path.join(spec.path, "config.json"), "diffusers config")
    size = config.get("sample_size") or 1
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    weights = sum(os.path.getsize(os.path.join(spec.path, name)) for name in os.listdir(spec.path)
                  if name.endswith((".safetensors", ".bin")) and os.path.isfile(os.path.join(spec.path, name)))
    return weights // 4, (int(config.get("in_channels") or 3), height, width)


def load_prior_unet(spec: PriorSpec, device):
    """The UNet a PriorSpec describes, loaded onto `device` in eval mode (a DiT without its CFG wrapper)."""
    if spec.kind == "dit":
        return load_dit(spec.path, preset=None, device=device, **spec.flags)
    if spec.kind == "adm":
        return load_adm(spec.path, spec.preset, device=device)
    if spec.kind == "diffusers":
        return load_diffusers_unet(spec.path, device=device, prediction_type=spec.prediction_type, schedule=spec.schedule)
    unet, _, _ = load_prior(spec.path, device=device)
    return unet


__all__ = [
    "PRIOR_KINDS",
    "PriorSpec",
    "declared_size",
    "describe_prior",
    "describe_prior_file",
    "is_prior_file",
    "load_prior",
    "load_prior_unet",
    "read_prior_header",
    "save_prior",
]
