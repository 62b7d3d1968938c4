"""Planning a run: every cheap check (arguments, files, class lists) and the job list, before any model loads.

Priors: a guided-diffusion ADM checkpoint (`--prior PATH --arch adm256-cond|adm256-uncond|
adm128-cond|adm64-cond`), a diffusers UNet2DModel folder (`--diffusers DIR`), or a prior trained by
`igds-fast train-prior` (`--prior FILE`, recognised by its header; it brings its own class list and
diffusion settings): `igds_fast.models.priors`.

Labels: the guidance label of a class is its position in the VE's class list; the prior is
conditioned on the class's index in the prior's class list (ImageNet-1K's sorted wnids for ADM
checkpoints and 1000-class diffusers priors; the file's own list for our priors; none for
unconditional priors).

A DiT / MinimaxDiffusion checkpoint (`--prior DiT-XL-2-256x256.pt [--prior-kind dit | --arch
dit-xl2-256]`) is a latent prior: `--vae DIR` decodes it, `--cfg-scale` / `--cfg-channels` set its
classifier-free guidance, and its steps default to DiT's 50.

beta: `--beta`, else `--beta-table` (from `igds-fast calibrate-beta`), else the built-in placeholder
table (guidance/beta_table.py).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ..artifacts import file_fingerprint, folder_fingerprint
from ..classes import resolve_classes
from ..devices import resolve_device
from ..diffusion import ScheduleConfig, resolve_eta, space_timesteps
from ..errors import IGDSInputError
from ..guidance import GuidanceConfig
from ..guidance.beta_table import resolve_beta
from ..imageio import check_output_folder
from ..jobs import ImageJob, build_jobs, check_folder_name
from ..limits import check_work_cap
from ..models.priors import PriorSpec, declared_size, describe_prior
from ..overlap import check_apart, inside
from ..sampling.backends import check_triton_runs_on, default_noise
from ..select import S3Config
from ..ve import VariationalEstimator
from .config import (CONFIG_FORMAT, DEFAULT_CFG_CHANNELS, DEFAULT_CFG_SCALE, DEFAULT_DIT_STEPS, DEFAULT_STEPS,
                     DEFAULT_BATCH_SIZE, FORMAT_VERSION, DistillConfig, ModelSettings)
from .work import DistillWork, check_counts, check_memory


@dataclass
class Plan:
    """A validated run: what to sample, with what, and where (nothing loaded but the VE).

    guidance: the run's GuidanceConfig with beta chosen and the prior's clip_x0; noise: the source
    the run draws from; steps: the respacing it runs (an int or a spec string).
    """

    config: DistillConfig
    ve: object
    prior: PriorSpec
    class_keys: list[str]
    ve_labels: list[int]
    prior_labels: list[int | None]
    prior_class_map: list[int] | None
    steps: int | str
    guidance: GuidanceConfig
    beta_source: str
    noise: str
    composite: int
    pixel_settings: dict
    jobs: list[ImageJob]
    device: torch.device
    work: DistillWork | None = None  # what the run holds at least (distill/work.py)

    @property
    def beta(self) -> float:
        return self.guidance.beta


def run_beta(config: DistillConfig) -> tuple[float, str]:
    """(beta, where it came from): --beta, else --beta-table at the IPC, else the placeholder table."""
    return resolve_beta(config.guidance.beta, config.beta_table, config.job.ipc)


def check_selection_paths(config: DistillConfig) -> S3Config | None:
    """The S3Config of a `--select s3` run after checking its paths (cheap, no image read), or None.

    Refused in one line: a missing --real / --select-encoder path, a candidates folder that is OUT
    or lies inside it (an ImageFolder reader of OUT would take it for a class), and any other overlap
    of --out, --candidates and --real (resolved through symlinks; igds_fast/overlap.py), or a
    candidates folder at / or the home folder.
    """
    selection = config.selection
    if selection is None:
        return None
    if selection.encoder is not None and not os.path.isfile(selection.encoder):
        raise IGDSInputError(f"--select-encoder checkpoint not found: {selection.encoder}")
    if selection.real is not None and not os.path.isdir(selection.real):
        raise IGDSInputError(f"--real {selection.real} is not a folder (an ImageFolder of real training images)")
    out = os.path.realpath(config.run.out)
    candidates = os.path.realpath(candidates_folder(config))
    if inside(candidates, out):
        raise IGDSInputError(f"the candidates folder {candidates} must not be inside the output folder {out} "
                             "(an image-folder reader would take it for a class)")
    check_output_folder(config.run.out)
    check_output_folder(candidates_folder(config), "--candidates")
    check_apart([("--out", config.run.out), ("--candidates", candidates_folder(config))],
                [("--real", selection.real)])
    return selection.s3


def candidates_folder(config: DistillConfig) -> str:
    """Where a --select run keeps its candidates: --candidates, else OUT.s3-candidates beside OUT."""
    if config.selection is not None and config.selection.candidates is not None:
        return config.selection.candidates
    return os.path.abspath(config.run.out).rstrip(os.sep) + ".s3-candidates"


def plan_distill(config: DistillConfig) -> Plan:
    """Validate everything cheap (files, class lists, the prior's header) and build the job list.

    Loads the VE (small) and reads the prior's header only; every defect is a one-line
    IGDSInputError raised before any model is built or sampled. (The tree validated its own values.)
    """
    if not isinstance(config, DistillConfig):
        raise IGDSInputError(f"plan_distill takes a DistillConfig, got {type(config).__name__}")
    if config.selection is not None:
        # distill() samples only; the selection stages around it live in distill_with_selection.
        raise IGDSInputError("--select runs through igds_fast.distill.distill_with_selection, not distill()")
    models, job, run, backend = config.models, config.job, config.run, config.backend
    # The IPC first: it alone bounds the job list (distill/work.py); the total needs the class count.
    check_work_cap("images per class", job.ipc, f"--ipc {job.ipc:,}", run.allow_large)
    if os.path.exists(run.out) and not os.path.isdir(run.out):
        raise IGDSInputError(f"output path {run.out!r} exists and is not a folder")
    check_output_folder(run.out)  # a dangling link, a read-only folder, / or home: now, not after the models load
    if not os.path.isfile(models.ve):
        raise IGDSInputError(f"VE bundle not found: {models.ve}")
    beta, beta_source = run_beta(config)
    device = resolve_device(run.device)
    noise = default_noise(backend.name, backend.noise)
    if backend.name != "eager" or noise == "philox" or config.guidance.head == "triton":
        # Before the VE loads: building a model imports triton (torch._dynamo), after which the
        # kernels can no longer select the interpreter on a CPU; one message for every Triton path.
        check_triton_runs_on(device)
    ve = VariationalEstimator.load(models.ve, device="cpu")
    ve_names = list(ve.class_names)
    spec = describe_prior(models.prior, models.arch, models.diffusers, ve_names, models.noise_schedule,
                          None if models.prior_class_names is None else list(models.prior_class_names),
                          models.prior_kind)
    latent = _check_latent_options(models, spec)
    guidance = dataclasses.replace(config.guidance, beta=beta, clip_x0=spec.clip_x0)
    steps = config.sampler.steps
    if steps is None:
        steps = DEFAULT_DIT_STEPS if spec.kind == "dit" else DEFAULT_STEPS
    schedule_config = ScheduleConfig(sampling_steps=str(steps), **spec.schedule)
    num_steps = len(space_timesteps(schedule_config.diffusion_steps, schedule_config.sampling_steps))
    guidance.check_window(num_steps)

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
    if job.classes is None:
        classes = ve_names
    else:
        classes, _ = resolve_classes(job.classes, universe)
    ve_index = {name: i for i, name in enumerate(ve_names)}
    outside = [name for name in classes if name not in ve_index]
    if outside:
        raise IGDSInputError(f"class {outside[0]!r} is not in the VE's class list ({len(outside)} such)")
    for name in classes:
        check_folder_name(name)
    ve_labels = [ve_index[name] for name in classes]
    prior_labels = [prior_class_map[label] if prior_class_map is not None else None for label in ve_labels]
    composite = job.composite if job.composite is not None else (4 if spec.kind == "adm" else 1)
    # The work this implies, bounded before the job list or any model is built (distill/work.py).
    samples = check_counts(len(classes), job.ipc, composite, run.allow_large, f"--ipc {job.ipc:,}")
    parameters, sample_shape = declared_size(spec)
    batch = 1 if run.batch_size is None and backend.name == "compiled" else (run.batch_size or DEFAULT_BATCH_SIZE)
    work = DistillWork(samples, min(batch, samples), parameters, sample_shape,
                       (ve.encoder.in_channels, ve.resolution, ve.resolution))
    check_memory(work, device, run.allow_large)
    jobs = build_jobs(classes, ve_labels, job.ipc, job.seed, composite)
    if run.batch_size is not None and run.batch_size < composite:
        raise IGDSInputError(f"batch size {run.batch_size} cannot hold one composite image ({composite} samples)")

    pixel_settings = {
        "format": CONFIG_FORMAT,
        "format_version": FORMAT_VERSION,
        "prior_kind": spec.kind,
        "prior_preset": spec.preset,
        "prior_fingerprint": spec.fingerprint,
        "diffusion": schedule_config.to_dict(),
        "ve_fingerprint": file_fingerprint(models.ve),
        "classes": list(classes),
        "ipc": job.ipc,
        "composite": composite,
        "seed": job.seed,
        "scale": float(guidance.scale),
        "beta": float(beta),
        "tau": None if guidance.tau is None else float(guidance.tau),
        "gamma": float(guidance.gamma),
        "mode": guidance.mode,
        "head": guidance.head,
        "noise": noise,
        "backend": backend.name,
    }
    if noise == "torch":
        pixel_settings["noise_source"] = torch_noise_source(device)
    # Only where they differ from the defaults: folders written before these settings stay resumable.
    if spec.prediction_type != "epsilon":
        pixel_settings["prediction_type"] = spec.prediction_type
    if not spec.clip_x0:
        pixel_settings["clip_x0"] = False
    if config.sampler.sampler != "ddpm":  # DDPM folders (every folder before DDIM) keep their record
        pixel_settings["sampler"] = config.sampler.sampler
        pixel_settings["eta"] = resolve_eta(config.sampler.sampler, config.sampler.eta)
    window = guidance.step_window(num_steps)  # the same record for either convention of one window
    if window != (0, None):
        pixel_settings["guide_window"] = list(window)
    if latent is not None:
        pixel_settings["latent"] = latent
    if backend.name == "compiled":
        options = backend.compile
        # The compute dtypes change the pixels; the other compile options only change the speed.
        pixel_settings["compile"] = {"dtype": options.dtype, "encoder_dtype": options.encoder_dtype or options.dtype}
        if latent is not None:
            pixel_settings["compile"]["decoder_dtype"] = options.decoder_dtype or options.encoder_dtype or options.dtype
        if options.unet_engine is not None:  # the engine's precision replaces the UNet dtype
            pixel_settings["compile"]["unet_engine"] = file_fingerprint(options.unet_engine)
    return Plan(config, ve, spec, list(classes), ve_labels, prior_labels, prior_class_map, steps, guidance,
                beta_source, noise, composite, pixel_settings, jobs, device, work)


def _check_latent_options(models: ModelSettings, spec: PriorSpec) -> dict | None:
    """The latent prior's pixel settings (VAE fingerprint, CFG scale and channels), or None for a pixel prior.

    A DiT needs --vae; --vae, --cfg-scale and --cfg-channels are refused for any other prior.
    """
    if not spec.latent:
        given = [flag for flag, value in (("--vae", models.vae), ("--cfg-scale", models.cfg_scale),
                                          ("--cfg-channels", models.cfg_channels)) if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise IGDSInputError(f"{', '.join(given)} {verb} to a latent (DiT) prior only; this prior is {spec.kind}")
        return None
    if not models.vae:
        raise IGDSInputError("a DiT prior samples latents: give --vae DIR (a local diffusers AutoencoderKL folder, "
                             "e.g. stabilityai/sd-vae-ft-mse)")
    vae_dir = os.path.abspath(models.vae)
    if os.path.isdir(os.path.join(vae_dir, "vae")) and not os.path.isfile(os.path.join(vae_dir, "config.json")):
        vae_dir = os.path.join(vae_dir, "vae")  # a pipeline root
    if not os.path.isfile(os.path.join(vae_dir, "config.json")):
        raise IGDSInputError(f"--vae {models.vae} is not a diffusers AutoencoderKL folder (no config.json)")
    cfg_scale = DEFAULT_CFG_SCALE if models.cfg_scale is None else models.cfg_scale
    channels = DEFAULT_CFG_CHANNELS if models.cfg_channels is None else models.cfg_channels
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


__all__ = ["Plan", "candidates_folder", "check_selection_paths", "plan_distill", "run_beta", "torch_noise_source"]
