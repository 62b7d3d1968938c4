"""Planning a run: every cheap check (arguments, files, class lists) and the job list, before any model loads.

Priors: a guided-diffusion ADM checkpoint (`--prior PATH --preset adm256-cond|adm256-uncond|
adm128-cond|adm64-cond`), a diffusers UNet2DModel folder (`--diffusers DIR`), or a prior trained by
`igds-fast train-prior` (`--prior FILE`, recognised by its header; it brings its own class list and
diffusion settings): `igds_fast.models.priors`.

Labels: the guidance label of a class is its position in the VE's class list; the prior is
conditioned on the class's index in the prior's class list (ImageNet-1K's sorted wnids for ADM
checkpoints and 1000-class diffusers priors; the file's own list for our priors; none for
unconditional priors).

A DiT / MinimaxDiffusion checkpoint (`--prior DiT-XL-2-256x256.pt [--prior-kind dit | --preset
dit-xl2-256]`) is a latent prior: `--vae DIR` decodes it, `--cfg-scale` / `--cfg-channels` set its
classifier-free guidance, and its steps default to DiT's 50.

beta: `--beta`, else `--beta-table` (from `igds-fast calibrate-beta`), else `DEFAULT_BETA_TABLE`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..artifacts import file_fingerprint, folder_fingerprint
from ..calibrate import beta_for_ipc, read_beta_table
from ..classes import resolve_classes
from ..diffusion import ScheduleConfig, space_timesteps
from ..errors import IGDSInputError
from ..guidance import GuidanceConfig
from ..jobs import COMPOSITE_SIZES, ImageJob, build_jobs, check_folder_name, check_positive_int
from ..models.priors import PriorSpec, describe_prior
from ..sampling.backends import check_triton_runs_on
from ..sampling.compiled.config import CompileConfig
from ..ve import VariationalEstimator
from .config import (CONFIG_FORMAT, DEFAULT_BETA_TABLE, DEFAULT_CFG_CHANNELS, DEFAULT_CFG_SCALE, DEFAULT_DIT_STEPS,
                     DEFAULT_STEPS, FORMAT_VERSION, SELECT_METHODS, DistillConfig)


@dataclass
class Plan:
    """A validated run: what to sample, with what, and where (nothing loaded but the VE)."""

    config: DistillConfig
    ve: object
    prior: PriorSpec
    class_keys: list[str]
    ve_labels: list[int]
    prior_labels: list[int | None]
    prior_class_map: list[int] | None
    steps: int | str
    beta: float
    beta_source: str
    composite: int
    pixel_settings: dict
    jobs: list[ImageJob]
    device: torch.device


def resolve_beta(config: DistillConfig) -> tuple[float, str]:
    """(beta, where it came from): --beta, else --beta-table at config.ipc, else DEFAULT_BETA_TABLE."""
    if config.beta is not None:
        if config.beta_table is not None:
            raise IGDSInputError("give --beta or --beta-table, not both")
        return float(config.beta), "given"
    if config.beta_table is not None:
        table = read_beta_table(config.beta_table)
        return beta_for_ipc(table, config.ipc), f"table {os.path.abspath(config.beta_table)}"
    return beta_for_ipc(DEFAULT_BETA_TABLE, config.ipc, log=None), "default table (placeholder, uncalibrated)"


def _check_scalars(config: DistillConfig) -> None:
    check_positive_int(config.ipc, "IPC")
    if config.steps is None:
        pass  # the prior's default (plan_distill)
    elif isinstance(config.steps, str):  # a timestep respacing ("250", "ddim50", "10,20,30"): ScheduleConfig checks it
        if not config.steps.strip():
            raise IGDSInputError("the timestep respacing is empty")
    else:
        check_positive_int(config.steps, "steps")
    if config.batch_size is not None:
        check_positive_int(config.batch_size, "batch size")
    if config.composite is not None and config.composite not in COMPOSITE_SIZES:
        raise IGDSInputError(f"composite must be one of {COMPOSITE_SIZES}, got {config.composite!r}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise IGDSInputError(f"seed must be a non-negative integer, got {config.seed!r}")
    if not config.out:
        raise IGDSInputError("give an output folder (--out)")
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise IGDSInputError(f"output path {config.out!r} exists and is not a folder")


def check_selection_options(config: DistillConfig):
    """The validated `S3Config` of a `--select s3` run, or None for plain sampling (cheap, no file read).

    Refused in one line: a selection option without --select s3 (naming it), an unknown --select,
    an S3 value out of range, a missing --real / --select-encoder path, and a candidates folder that is OUT or lies inside it (an
    ImageFolder reader of OUT would take it for a class) or holds OUT.
    """
    from ..select import S3Config  # the selection library (no model code)

    given = [flag for name, flag in DistillConfig.SELECTION_FLAGS if getattr(config, name) is not None]
    if config.select is None:
        if given:
            raise IGDSInputError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --select s3 only")
        return None
    if config.select not in SELECT_METHODS:
        raise IGDSInputError(f"--select must be one of {', '.join(SELECT_METHODS)}, got {config.select!r}")
    defaults = S3Config()
    s3 = S3Config(
        groups=defaults.groups if config.groups is None else config.groups,
        alpha=defaults.alpha if config.select_alpha is None else config.select_alpha,
        beta=defaults.beta if config.select_beta is None else config.select_beta,
        eps=defaults.eps if config.select_eps is None else config.select_eps,
        max_passes=defaults.max_passes if config.select_max_passes is None else config.select_max_passes,
        real_per_class=defaults.real_per_class if config.real_per_class is None else config.real_per_class,
    )
    if config.select_encoder is not None and not os.path.isfile(config.select_encoder):
        raise IGDSInputError(f"--select-encoder checkpoint not found: {config.select_encoder}")
    if config.real is not None and not os.path.isdir(config.real):
        raise IGDSInputError(f"--real {config.real} is not a folder (an ImageFolder of real training images)")
    if config.out:
        out = os.path.realpath(config.out)
        candidates = os.path.realpath(candidates_folder(config))
        if candidates == out or candidates.startswith(out + os.sep):
            raise IGDSInputError(f"the candidates folder {candidates} must not be inside the output folder {out} "
                                 "(an image-folder reader would take it for a class)")
        if out.startswith(candidates + os.sep):
            raise IGDSInputError(f"the output folder {out} must not be inside the candidates folder {candidates}")
    return s3


def candidates_folder(config: DistillConfig) -> str:
    """Where a --select run keeps its candidates: --candidates, else OUT.s3-candidates beside OUT."""
    if config.candidates is not None:
        return config.candidates
    return os.path.abspath(config.out).rstrip(os.sep) + ".s3-candidates"


def compile_config(config: DistillConfig):
    """The validated CompileConfig of a compiled run (one-line IGDSInputError on a bad option)."""
    options = config.compile_options
    if options is not None and not isinstance(options, dict):
        raise IGDSInputError(f"compile options must be a JSON object, got {type(options).__name__}")
    return CompileConfig.from_options(options)


def plan_distill(config: DistillConfig) -> Plan:
    """Validate everything cheap (arguments, files, class lists) and build the job list.

    Loads the VE (small) and reads the prior's header only; every defect is a one-line
    IGDSInputError raised before any model is built or sampled.
    """
    _check_scalars(config)
    if config.select is not None:
        # distill() samples only; the selection stages around it live in distill_with_selection.
        raise IGDSInputError("--select runs through igds_fast.distill.distill_with_selection, not distill()")
    check_selection_options(config)  # selection options without --select are refused
    if not config.ve:
        raise IGDSInputError("give a variational estimator (--ve PATH)")
    if not os.path.isfile(config.ve):
        raise IGDSInputError(f"VE bundle not found: {config.ve}")
    beta, beta_source = resolve_beta(config)
    device = torch.device(config.device) if config.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    noise = config.noise or ("philox" if config.backend == "compiled" else "torch")
    if config.backend == "compiled" or noise == "philox" or config.head == "triton":
        # Before the VE loads: building a model imports triton (torch._dynamo), after which the
        # kernels can no longer select the interpreter on a CPU; one message for every Triton path.
        check_triton_runs_on(device)
    if config.backend == "compiled" and config.head != "autograd":
        raise IGDSInputError(f"--head {config.head} applies to the eager backend; the compiled backend always "
                             "runs the Triton guidance head")
    ve = VariationalEstimator.load(config.ve, device="cpu")
    ve_names = list(ve.class_names)
    spec = describe_prior(config.prior, config.preset, config.diffusers, ve_names, config.noise_schedule,
                          config.prior_class_names, config.prior_kind)
    latent = _check_latent_options(config, spec)
    # The guidance settings are validated here, before any model is built.
    GuidanceConfig(scale=config.scale, beta=beta, tau=config.tau, gamma=config.gamma, mode=config.mode, head=config.head,
                   guide_from_step=config.guide_from_step, guide_until_step=config.guide_until_step)
    steps = config.steps if config.steps is not None else (DEFAULT_DIT_STEPS if spec.kind == "dit" else DEFAULT_STEPS)
    schedule_config = ScheduleConfig(sampling_steps=str(steps), **spec.schedule)
    num_steps = len(space_timesteps(schedule_config.diffusion_steps, schedule_config.sampling_steps))
    if config.guide_from_step >= num_steps:
        raise IGDSInputError(f"--guide-from-step {config.guide_from_step} is past the last of {num_steps} sampling steps")

    if spec.class_names is not None:
        prior_index = {name: i for i, name in enumerate(spec.class_names)}
        missing = [name for name in ve_names if name not in prior_index]
        if missing:
            raise IGDSInputError(
                f"{len(missing)} VE class(es) are not in the prior's class list (e.g. {', '.join(missing[:3])})"
            )
        prior_class_map = [prior_index[name] for name in ve_names]
        universe = spec.class_names
    else:
        prior_class_map, universe = None, ve_names
    if config.classes is None:
        classes = ve_names
    else:
        classes, _ = resolve_classes(config.classes, universe)
    ve_index = {name: i for i, name in enumerate(ve_names)}
    outside = [name for name in classes if name not in ve_index]
    if outside:
        raise IGDSInputError(f"class {outside[0]!r} is not in the VE's class list ({len(outside)} such)")
    for name in classes:
        check_folder_name(name)
    ve_labels = [ve_index[name] for name in classes]
    prior_labels = [prior_class_map[label] if prior_class_map is not None else None for label in ve_labels]
    composite = config.composite if config.composite is not None else (4 if spec.kind == "adm" else 1)
    jobs = build_jobs(classes, ve_labels, config.ipc, config.seed, composite)
    if config.batch_size is not None and config.batch_size < composite:
        raise IGDSInputError(f"batch size {config.batch_size} cannot hold one composite image ({composite} samples)")

    pixel_settings = {
        "format": CONFIG_FORMAT,
        "format_version": FORMAT_VERSION,
        "prior_kind": spec.kind,
        "prior_preset": spec.preset,
        "prior_fingerprint": spec.fingerprint,
        "diffusion": schedule_config.to_dict(),
        "ve_fingerprint": file_fingerprint(config.ve),
        "classes": list(classes),
        "ipc": config.ipc,
        "composite": composite,
        "seed": config.seed,
        "scale": float(config.scale),
        "beta": float(beta),
        "tau": None if config.tau is None else float(config.tau),
        "gamma": float(config.gamma),
        "mode": config.mode,
        "head": config.head,
        "noise": noise,
        "backend": config.backend,
    }
    if pixel_settings["noise"] == "torch":
        pixel_settings["noise_source"] = torch_noise_source(device)
    # Only where they differ from the defaults: folders written before these settings stay resumable.
    if spec.prediction_type != "epsilon":
        pixel_settings["prediction_type"] = spec.prediction_type
    if not spec.clip_x0:
        pixel_settings["clip_x0"] = False
    if config.guide_from_step != 0 or config.guide_until_step is not None:
        pixel_settings["guide_window"] = [config.guide_from_step, config.guide_until_step]
    if latent is not None:
        pixel_settings["latent"] = latent
    if config.backend == "compiled":
        options = compile_config(config)
        # The compute dtypes change the pixels; the other compile options only change the speed.
        pixel_settings["compile"] = {"dtype": options.dtype, "encoder_dtype": options.encoder_dtype or options.dtype}
        if latent is not None:
            pixel_settings["compile"]["decoder_dtype"] = options.decoder_dtype or options.encoder_dtype or options.dtype
        if options.unet_engine is not None:  # the engine's precision replaces the UNet dtype
            pixel_settings["compile"]["unet_engine"] = file_fingerprint(options.unet_engine)
    elif config.compile_options:
        raise IGDSInputError("compile options apply to --backend compiled only")
    return Plan(config, ve, spec, list(classes), ve_labels, prior_labels, prior_class_map, steps, beta, beta_source,
                composite, pixel_settings, jobs, device)


def _check_latent_options(config: DistillConfig, spec: PriorSpec) -> dict | None:
    """The latent prior's pixel settings (VAE fingerprint, CFG scale and channels), or None for a pixel prior.

    A DiT needs --vae; --vae, --cfg-scale and --cfg-channels are refused for any other prior.
    """
    if not spec.latent:
        given = [flag for flag, value in (("--vae", config.vae), ("--cfg-scale", config.cfg_scale),
                                          ("--cfg-channels", config.cfg_channels)) if value is not None]
        if given:
            raise IGDSInputError(f"{', '.join(given)} apply to a latent (DiT) prior only; this prior is {spec.kind}")
        return None
    if not config.vae:
        raise IGDSInputError("a DiT prior samples latents: give --vae DIR (a local diffusers AutoencoderKL folder, "
                             "e.g. stabilityai/sd-vae-ft-mse)")
    vae_dir = os.path.abspath(config.vae)
    if os.path.isdir(os.path.join(vae_dir, "vae")) and not os.path.isfile(os.path.join(vae_dir, "config.json")):
        vae_dir = os.path.join(vae_dir, "vae")  # a pipeline root
    if not os.path.isfile(os.path.join(vae_dir, "config.json")):
        raise IGDSInputError(f"--vae {config.vae} is not a diffusers AutoencoderKL folder (no config.json)")
    cfg_scale = DEFAULT_CFG_SCALE if config.cfg_scale is None else config.cfg_scale
    channels = DEFAULT_CFG_CHANNELS if config.cfg_channels is None else config.cfg_channels
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not cfg_scale >= 0:
        raise IGDSInputError(f"the CFG scale must be a number >= 0, got {cfg_scale!r}")
    latent_channels = int(spec.flags["in_channels"])
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= latent_channels:
        raise IGDSInputError(f"--cfg-channels must be in [1, {latent_channels}], got {channels!r}")
    return {"vae_fingerprint": folder_fingerprint(vae_dir), "cfg_scale": float(cfg_scale), "cfg_channels": channels}


def torch_noise_source(device: torch.device) -> str:
    """Which generator "torch" noise comes from, for the folder's pixel settings.

    torch noise is drawn by the device's own generator: the CPU's (mt19937) and CUDA's (Philox, laid
    out by the launch geometry, which depends on the GPU's multiprocessor count) give different noise
    for the same seed, so a folder is resumed only where its noise is the same. "philox" noise is
    the same on every device (the Triton kernel and its numpy reference agree bit for bit).
    """
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


__all__ = ["Plan", "candidates_folder", "check_selection_options", "compile_config", "plan_distill",
           "resolve_beta", "torch_noise_source"]
