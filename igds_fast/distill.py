"""`igds-fast distill`: sample IPC images per class with IGDS and write them as an image folder.

    OUT/<class>/<index:05d>.png    exactly IPC files per class (<class> = wnid or class name)
    OUT/manifest.json              every setting, versions, per-image seeds and labels, wall time, images/s
    OUT/preview.png                one row per class (at most 20 classes, 10 images each)
    OUT/.igds_config.json          the settings that determine the pixels, written first

Priors: a guided-diffusion ADM checkpoint (`--prior PATH --preset adm256-cond|adm256-uncond|
adm128-cond|adm64-cond`), a diffusers UNet2DModel folder (`--diffusers DIR`), or a prior trained by
`igds_fast.train_prior` (`--prior FILE`, recognised by its header; it brings its own class list and
diffusion settings).

Labels: the guidance label of a class is its position in the VE's class list; the prior is
conditioned on the class's index in the prior's class list (ImageNet-1K's sorted wnids for ADM
checkpoints and 1000-class diffusers priors; the file's own list for our priors; none for
unconditional priors).

Resume: every file appears only by an atomic rename, so an existing image is complete. Work is cut
into fixed batches of the full job list (interleaving classes); a rerun skips the batches whose
images all exist and re-samples a partly written batch with exactly its original members, writing
only its missing files. Because a batch is always computed with the same members, a resumed run's
files equal an uninterrupted run's byte for byte (eager backend; same batch size, device and thread
count — on CUDA through `sampler.fp32_reference_math` and atomic-free backward passes; with
another batch size images agree to float rounding, or byte for byte with `batch_invariant`). With
gamma != 0 the batch size decides which images are coupled, so it is saved (`.igds_batch.json`) and
a resume reuses it; another --batch-size is refused.
A rerun whose pixel settings differ from
`.igds_config.json` is refused, naming the setting; `force` clears the folder's images first.

beta: `--beta`, else `--beta-table` (from `igds-fast calibrate-beta`), else `DEFAULT_BETA_TABLE`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import __version__
from .errors import IGDSInputError
from .imageio import make_composite, make_preview_grid, save_png_atomic, write_json_atomic
from .jobs import (
    COMPOSITE_SIZES,
    ImageJob,
    batch_samples,
    build_jobs,
    check_folder_name,
    check_positive_int,
    is_done,
)
from .progress import Progress

# Placeholder beta per IPC (IGDS_SPEC section 6): the paper's calibrated values did not survive
# text extraction; it only states that beta is small at IPC 1 and grows with IPC. These numbers
# follow that shape and nothing more -- calibrate them for a real data set with
# `igds-fast calibrate-beta` and pass `--beta-table beta.json`.
DEFAULT_BETA_TABLE: dict[int, float] = {1: 0.0, 10: 0.1, 20: 0.2, 50: 0.5, 100: 1.0}
# Guidance scale s in mu~ = mu + s sigma^2 g. The paper's value is lost too: 1.0 is classifier
# guidance's neutral setting (Dhariwal & Nichol use 1.0 for their conditional 256 model); a placeholder.
DEFAULT_SCALE = 1.0
DEFAULT_STEPS = 250  # the paper runs 250 respaced DDPM steps
DEFAULT_BATCH_SIZE = 32
PREVIEW_MAX_CLASSES = 20
PREVIEW_MAX_IMAGES = 10
CONFIG_NAME = ".igds_config.json"
BATCH_NAME = ".igds_batch.json"  # the batch size a gamma != 0 folder was started with (it couples batch members)
MANIFEST_NAME = "manifest.json"
PREVIEW_NAME = "preview.png"
CONFIG_FORMAT = "igds_distill_config"
MANIFEST_FORMAT = "igds_distill_manifest"
FORMAT_VERSION = 1
FULL_HASH_LIMIT = 256 << 20  # files up to this size are hashed whole; larger ones by head + tail
PARTIAL_HASH_CHUNK = 16 << 20


@dataclass
class DistillConfig:
    """Every setting of a distillation run (the CLI fills this; `distill()` runs it).

    Prior (exactly one): prior + preset (ADM checkpoint), diffusers (folder), or prior alone (a file
    written by igds_fast.train_prior). ve: VE bundle. classes: class spec (list name, file, indices or
    class ids; None = every VE class in VE order). ipc: output images per class. beta / beta_table
    (None / None = DEFAULT_BETA_TABLE). scale: guidance scale (0 = plain DDPM). steps: respaced
    sampling steps. composite: samples per output image (1 or 4; None = 4 for ADM presets, as the
    paper, else 1). batch_size: samples per sampler call (None = DEFAULT_BATCH_SIZE for the eager
    backend; the compiled backend chooses it from free device memory, the smallest choice of all
    ranks under torchrun, and pads a short last batch that follows full ones to it, so no new
    graph is compiled and captured).
    seed: global seed of every image seed.
    force: clear a folder of another configuration. device: torch device (None = cuda if available).
    tau / gamma / mode / head / noise / backend: GuidanceConfig and Sampler options (None tau = the
    VE's; None noise = "philox" for the compiled backend, which draws its noise in-kernel, else
    "torch"). compile_options: CompileConfig fields for the compiled backend (dict; e.g.
    {"dtype": "fp16"}). noise_schedule: the diffusion of a diffusers prior (its UNet folder does not record it).
    progress: report progress on stderr. prior_class_names: the class list of a diffusers prior
    that is conditional on neither ImageNet-1K nor the VE's list (None = infer).
    """

    ve: str
    out: str
    ipc: int
    prior: str | None = None
    preset: str | None = None
    diffusers: str | None = None
    classes: str | None = None
    beta: float | None = None
    beta_table: str | None = None
    scale: float = DEFAULT_SCALE
    steps: int = DEFAULT_STEPS
    composite: int | None = None
    batch_size: int | None = None
    seed: int = 0
    force: bool = False
    device: str | None = None
    tau: float | None = None
    gamma: float = 0.0
    mode: str = "x0"
    head: str = "autograd"
    noise: str | None = None
    backend: str = "eager"
    compile_options: dict | None = None
    noise_schedule: str = "linear"
    progress: bool = True
    prior_class_names: list[str] | None = field(default=None)
    batch_invariant: bool = False


# ---- fingerprints ---------------------------------------------------------------------------------


def file_fingerprint(path: str) -> dict:
    """{"size", "sha256"} of a file; files over FULL_HASH_LIMIT hash their size, first and last 16 MiB.

    Identity, not security: it tells a rerun whether the model it loads is the one the folder was
    made with, without reading a multi-GB checkpoint in full every time.
    """
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
            kind = "sha256"
        else:
            digest.update(str(size).encode())
            digest.update(handle.read(PARTIAL_HASH_CHUNK))
            handle.seek(size - PARTIAL_HASH_CHUNK)
            digest.update(handle.read(PARTIAL_HASH_CHUNK))
            kind = "sha256-head-tail"
    return {"size": size, kind: digest.hexdigest()}


def folder_fingerprint(directory: str) -> dict:
    """Fingerprints of the files of a diffusers model folder (config + weights), by relative name."""
    entries = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not name.startswith("."):
            entries[name] = file_fingerprint(path)
    return entries


# ---- the loaded pieces ----------------------------------------------------------------------------


@dataclass
class PriorSpec:
    """What is known about a prior before its weights are loaded (for validation and the config)."""

    kind: str  # "adm" | "igds" | "diffusers"
    path: str
    preset: str | None
    class_names: list[str] | None  # None = unconditional
    schedule: dict  # ScheduleConfig fields except sampling_steps
    fingerprint: dict


def _describe_prior(config: DistillConfig, ve_class_names: list[str]) -> PriorSpec:
    """Identify the prior, its class list and diffusion without loading its weights."""
    from .classes import imagenet_wnids

    given = [name for name, value in (("--prior", config.prior), ("--diffusers", config.diffusers)) if value]
    if len(given) != 1:
        raise IGDSInputError("give exactly one prior: --prior PATH [--preset NAME] or --diffusers DIR")
    if config.diffusers:
        directory = os.path.abspath(config.diffusers)
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise IGDSInputError(f"not a diffusers model folder (no config.json): {config.diffusers}")
        if config.preset:
            raise IGDSInputError("--preset applies to --prior checkpoints, not to --diffusers folders")
        try:
            with open(config_path, encoding="utf-8") as handle:
                unet_config = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise IGDSInputError(f"cannot read {config_path}: {exc}") from exc
        num_classes = unet_config.get("num_class_embeds")
        if config.prior_class_names is not None:
            class_names = list(config.prior_class_names)
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
        schedule = {"noise_schedule": config.noise_schedule, "diffusion_steps": 1000, "fixed_variance": "large"}
        return PriorSpec("diffusers", directory, None, class_names, schedule, folder_fingerprint(directory))

    return describe_prior_file(config.prior, config.preset)


def describe_prior_file(prior: str, preset: str | None) -> PriorSpec:
    """A --prior file: an ADM checkpoint (with its preset) or a prior written by train-prior."""
    from .classes import imagenet_wnids
    from .models.adm import ADM_DIFFUSION_FLAGS, ADM_PRESETS

    path = os.path.abspath(prior)
    if not os.path.isfile(path):
        raise IGDSInputError(f"prior checkpoint not found: {prior}")
    if preset:
        if preset not in ADM_PRESETS:
            raise IGDSInputError(f"unknown ADM preset {preset!r}; available: {', '.join(sorted(ADM_PRESETS))}")
        flags = ADM_PRESETS[preset]
        class_names = imagenet_wnids() if flags.get("class_cond") else None
        schedule = {**ADM_DIFFUSION_FLAGS[preset], "fixed_variance": "large"}
        return PriorSpec("adm", path, preset, class_names, schedule, file_fingerprint(path))

    from .train_prior import read_prior_header

    try:
        header = read_prior_header(path)
    except IGDSInputError as exc:
        raise IGDSInputError(
            f"{exc}; for a guided-diffusion checkpoint pass --preset ({', '.join(sorted(ADM_PRESETS))})"
        ) from None
    class_names = [str(name) for name in header["class_names"]] if header["flags"].get("class_cond") else None
    schedule = {
        "noise_schedule": header["diffusion"]["noise_schedule"],
        "diffusion_steps": int(header["diffusion"]["diffusion_steps"]),
        "fixed_variance": header["diffusion"].get("fixed_variance", "small"),
    }
    return PriorSpec("igds", path, None, class_names, schedule, file_fingerprint(path))


def _load_prior_unet(spec: PriorSpec, device):
    if spec.kind == "adm":
        from .models.adm import load_adm

        return load_adm(spec.path, spec.preset, device=device)
    if spec.kind == "diffusers":
        from .models.diffusers_unet import load_diffusers_unet

        return load_diffusers_unet(spec.path, device=device)
    from .train_prior import load_prior

    unet, _, _ = load_prior(spec.path, device=device)
    return unet


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
    beta: float
    beta_source: str
    composite: int
    pixel_settings: dict
    jobs: list[ImageJob]
    device: torch.device


def _resolve_beta(config: DistillConfig) -> tuple[float, str]:
    from .calibrate import beta_for_ipc, read_beta_table

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


def _compile_config(config: DistillConfig):
    """The validated CompileConfig of a compiled run (one-line IGDSInputError on a bad option)."""
    from .sampling.compiled import CompileConfig

    options = config.compile_options
    if options is not None and not isinstance(options, dict):
        raise IGDSInputError(f"compile options must be a JSON object, got {type(options).__name__}")
    return CompileConfig.from_options(options)


def plan_distill(config: DistillConfig) -> Plan:
    """Validate everything cheap (arguments, files, class lists) and build the job list.

    Loads the VE (small) and reads the prior's header only; every defect is a one-line
    IGDSInputError raised before any model is built or sampled.
    """
    from .classes import resolve_classes
    from .guidance import GuidanceConfig
    from .diffusion import ScheduleConfig
    from .ve import VariationalEstimator

    _check_scalars(config)
    if not config.ve:
        raise IGDSInputError("give a variational estimator (--ve PATH)")
    if not os.path.isfile(config.ve):
        raise IGDSInputError(f"VE bundle not found: {config.ve}")
    beta, beta_source = _resolve_beta(config)
    device = torch.device(config.device) if config.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ve = VariationalEstimator.load(config.ve, device="cpu")
    ve_names = list(ve.class_names)
    spec = _describe_prior(config, ve_names)
    # The guidance settings are validated here, before any model is built.
    GuidanceConfig(scale=config.scale, beta=beta, tau=config.tau, gamma=config.gamma, mode=config.mode, head=config.head)
    schedule_config = ScheduleConfig(sampling_steps=str(config.steps), **spec.schedule)

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
        "diffusion": dataclasses.asdict(schedule_config),
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
        "noise": config.noise or ("philox" if config.backend == "compiled" else "torch"),
        "backend": config.backend,
    }
    if pixel_settings["noise"] == "torch":
        pixel_settings["noise_source"] = torch_noise_source(device)
    if config.backend == "compiled":
        compile_config = _compile_config(config)
        # The compute dtypes change the pixels; the other compile options only change the speed.
        pixel_settings["compile"] = {"dtype": compile_config.dtype,
                                     "encoder_dtype": compile_config.encoder_dtype or compile_config.dtype}
        if compile_config.unet_engine is not None:  # the engine's precision replaces the UNet dtype
            pixel_settings["compile"]["unet_engine"] = file_fingerprint(compile_config.unet_engine)
    elif config.compile_options:
        raise IGDSInputError("compile options apply to --backend compiled only")
    return Plan(config, ve, spec, list(classes), ve_labels, prior_labels, prior_class_map, beta, beta_source,
                composite, pixel_settings, jobs, device)


# ---- the output folder ----------------------------------------------------------------------------


def coupled_batch_size(out: str, config: "DistillConfig", composite: int) -> int | None:
    """The batch size a gamma != 0 folder was started with (None: none saved, or gamma = 0).

    With gamma != 0 the diversity term couples the samples of one class within a batch, so the batch
    size decides which images are computed together, hence their pixels: a resume must cut the same
    batches. A different --batch-size is refused (one line); without one, the saved size is used
    (no free-memory probe).
    """
    path = os.path.join(out, BATCH_NAME)
    if not config.gamma or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            saved = int(json.load(handle)["batch_size"])
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError):
        raise IGDSInputError(f"{path} is unreadable; use --force to clear the folder") from None
    asked = config.batch_size
    if asked is not None and max(composite, asked - asked % composite) != saved:
        raise IGDSInputError(
            f"{out} was started with batch size {saved} and gamma {config.gamma:g} couples the images of a "
            f"batch: rerun with --batch-size {saved} (or without --batch-size), or use --force to clear it"
        )
    return saved


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


def _differing_setting(saved: dict, current: dict) -> str | None:
    """The first setting (by name) whose value differs, described for a one-line error."""
    for key in current:
        if saved.get(key) != current[key]:
            def short(value):
                text = json.dumps(value, sort_keys=True)
                return text if len(text) <= 60 else text[:57] + "..."
            return f"{key} (folder: {short(saved.get(key))}, now: {short(current[key])})"
    for key in saved:
        if key not in current:
            return f"{key} (folder has it, this run does not)"
    return None


def _clear_outputs(out: str, class_keys: list[str]) -> None:
    """Remove what distill writes: class-folder PNGs and temp files, the preview, manifest, config."""
    with os.scandir(out) as entries:
        folders = [entry.path for entry in entries if entry.is_dir(follow_symlinks=False)]
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and (
                    entry.name.endswith(".png") or (entry.name.startswith(".") and entry.name.endswith(".tmp"))
                ):
                    os.unlink(entry.path)
        if not os.listdir(folder):
            os.rmdir(folder)
    for name in (MANIFEST_NAME, PREVIEW_NAME, CONFIG_NAME, BATCH_NAME):
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.unlink(path)


def prepare_output(out: str, pixel_settings: dict, class_keys: list[str], force: bool, log) -> int:
    """Make `out` hold this configuration: check or write `.igds_config.json` first, create class folders.

    Returns how many finished PNGs the folder already holds for this configuration.
    Refuses (one line) a folder written with other pixel settings, or a non-empty folder that is
    not a distill output, unless `force` (then its images are cleared).
    """
    os.makedirs(out, exist_ok=True)
    config_path = os.path.join(out, CONFIG_NAME)
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as handle:
                saved = json.load(handle)
        except (OSError, json.JSONDecodeError):
            saved = {"format": "unreadable"}
        difference = _differing_setting(saved, pixel_settings)
        if difference is not None:
            if not force:
                raise IGDSInputError(
                    f"{out} holds images of another configuration: {difference}; "
                    "use --force to clear it or choose another --out"
                )
            log(f"distill: --force: clearing {out} (it held another configuration: {difference})")
            _clear_outputs(out, class_keys)
    else:
        visible = [name for name in os.listdir(out) if not name.startswith(".")]
        if visible:
            if not force:
                raise IGDSInputError(
                    f"{out} is not empty and was not written by distill (no {CONFIG_NAME}); "
                    "use --force to clear its images or choose another --out"
                )
            log(f"distill: --force: clearing the images of {out}")
            _clear_outputs(out, class_keys)
    if not os.path.isfile(config_path):
        write_json_atomic(config_path, pixel_settings)  # first: a crash leaves a folder that knows its settings
    for key in class_keys:
        folder = os.path.join(out, key)
        os.makedirs(folder, exist_ok=True)
        # Temp files left by a writer killed mid-write (SIGKILL, a dead rank): never a finished image.
        # Safe to remove here: no writer of this run has started yet (under torchrun rank 0 prepares
        # the folder while the other ranks wait).
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(folder, name))
    return sum(
        1 for key in class_keys for name in os.listdir(os.path.join(out, key)) if name.endswith(".png")
    )


def _read_png(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if image.mode in ("L", "I", "1") else "RGB"), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def write_preview(out: str, class_keys: list[str], ipc: int) -> str | None:
    """OUT/preview.png from the files on disk: one row per class (<= 20), <= 10 images per row."""
    rows = []
    for key in class_keys[:PREVIEW_MAX_CLASSES]:
        row = []
        for index in range(min(ipc, PREVIEW_MAX_IMAGES)):
            path = os.path.join(out, key, f"{index:05d}.png")
            if os.path.isfile(path):
                row.append(_read_png(path))
        if row:
            rows.append(row)
    if not rows:
        return None
    grid = make_preview_grid(rows, max_rows=PREVIEW_MAX_CLASSES, padding=2, pad_value=0)
    path = os.path.join(out, PREVIEW_NAME)
    save_png_atomic(path, grid)
    return path


# ---- running --------------------------------------------------------------------------------------


def _fixed_batches(jobs: list[ImageJob], batch_size: int, composite: int) -> list[list[ImageJob]]:
    """Fixed chunks of the full job list: a batch always has the same members, run to run."""
    per_batch = max(1, batch_size // composite)
    return [jobs[start : start + per_batch] for start in range(0, len(jobs), per_batch)]


def _versions() -> dict:
    return {
        "igds_fast": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def distill(config: DistillConfig, log: Callable[[str], None] = _stderr, plan: Plan | None = None) -> dict:
    """Run (or resume) a distillation; returns the manifest dict (also written to OUT/manifest.json)."""
    from .guidance import GuidanceConfig
    from .diffusion import DiffusionSchedule, ScheduleConfig
    from .sampling import Sampler

    from .distributed import (
        agree_min, barrier, gather_to_main, init_distributed, main_first, rank_device, shard, shutdown,
    )

    started = time.perf_counter()
    # Under torchrun: rank 0 validates the inputs and prepares the folder first; the other ranks wait,
    # so a bad input fails once with one message. A single process runs the same code unchanged.
    ctx = init_distributed(config.device)
    plan = plan if plan is not None else main_first(ctx, lambda: plan_distill(config))
    device = torch.device(rank_device(ctx, str(plan.device))) if ctx.enabled else plan.device
    out = config.out

    def prepare() -> tuple[int, int | None]:
        if ctx.is_main:
            done = prepare_output(out, plan.pixel_settings, plan.class_keys, config.force, log)
        else:
            done = sum(1 for job in plan.jobs if is_done(job, out))
        return done, coupled_batch_size(out, config, plan.composite)

    already, saved_batch_size = main_first(ctx, prepare)
    total_images = len(plan.jobs)

    def build_sampler():
        unet = _load_prior_unet(plan.prior, device)
        schedule = DiffusionSchedule(ScheduleConfig(**plan.pixel_settings["diffusion"]), device=device)
        guidance = GuidanceConfig(
            scale=float(config.scale), beta=float(plan.beta), tau=config.tau, gamma=float(config.gamma),
            mode=config.mode, head=config.head,
        )
        options = _compile_config(config) if config.backend == "compiled" else None
        return Sampler(unet, schedule, plan.ve.to(device), guidance, backend=config.backend,
                       prior_class_map=plan.prior_class_map, noise=plan.pixel_settings["noise"],
                       batch_invariant=config.batch_invariant, backend_options=options)

    sampler = None
    batch_size = config.batch_size or saved_batch_size
    pad = config.backend == "compiled"  # static shapes: a short last batch reuses the full batches' graphs
    if batch_size is None:
        if pad and already < total_images:
            # Every rank sees the same folder, so all of them take this branch and meet in agree_min.
            sampler = build_sampler()
            batch_size = agree_min(ctx, sampler.preferred_batch_size or DEFAULT_BATCH_SIZE)
        else:
            batch_size = DEFAULT_BATCH_SIZE
    batch_size = max(plan.composite, batch_size - batch_size % plan.composite)  # whole composites only
    if config.gamma and saved_batch_size is None and ctx.is_main:
        write_json_atomic(os.path.join(out, BATCH_NAME), {"batch_size": batch_size})
    batches = _fixed_batches(plan.jobs, batch_size, plan.composite)
    # Fixed batches, dealt round-robin: a batch has the same members whatever the world size, and the
    # ranks share the work still to do after a resume equally.
    todo = shard([batch for batch in batches if not all(is_done(job, out) for job in batch)], ctx)
    written = 0
    sampled = 0
    sampling_seconds = 0.0
    if todo:
        log(
            f"distill: {len(plan.class_keys)} classes x IPC {config.ipc} = {total_images} images "
            f"({plan.composite} sample(s) each), {total_images - already} to make, beta {plan.beta:g} "
            f"({plan.beta_source}), scale {config.scale:g}, {config.steps} steps, batch {batch_size}, "
            f"backend {config.backend}, device {plan.device}"
        )
        sampler = sampler or build_sampler()
        progress = Progress(total_images, unit="img", label="distill", initial=already, enabled=config.progress)
        progress.start()
        sampling_start = time.perf_counter()
        for batch_number, batch in enumerate(todo):
            samples = batch_samples(batch)
            group_ids = None
            if config.gamma:
                # The diversity term couples the samples of one class in the batch (IGDS_SPEC section 4).
                group_ids = [sample.label for sample in samples]
            # Pad a short batch only after a full one: then its graphs exist and padding replaces a new
            # compile and capture; a run whose only batch is short just runs at its own size.
            pad_to = batch_size if pad and batch_number > 0 else None
            images = sampler.sample([s.label for s in samples], [s.seed for s in samples], group_ids=group_ids,
                                    pad_to=pad_to)
            images = images.detach().to("cpu", torch.float32)
            sampled += len(samples)
            for position, job in enumerate(batch):
                if is_done(job, out):
                    continue  # written before an interruption: never rewritten
                members = images[position * plan.composite : (position + 1) * plan.composite]
                image = make_composite(members) if plan.composite == 4 else members[0]
                save_png_atomic(os.path.join(out, job.relative_path), image)
                written += 1
                progress.update(1)
        sampling_seconds = time.perf_counter() - sampling_start
        progress.close()
    elif ctx.enabled and already < total_images:
        log(f"distill: rank {ctx.rank} has no share of the {total_images - already} images left")
    else:
        log(f"distill: {out} already holds all {total_images} images of this configuration; nothing to sample")

    rank_stats = {
        "rank": ctx.rank,
        "device": str(device),
        "batch_size": batch_size,
        "images_written": written,
        "samples_generated": sampled,
        "sampling_time_s": round(sampling_seconds, 3),
        "images_per_s": round(written / sampling_seconds, 4) if sampling_seconds > 0 else None,
    }
    report = getattr(getattr(sampler, "_step", None), "self_check_report", None)
    if report is not None:  # the compiled backend's first-step errors against the eager float32 step
        rank_stats["self_check"] = {part["part"]: float(f"{part['error']:.3g}") for part in report["parts"]}
    gathered = gather_to_main(ctx, rank_stats)
    if not ctx.is_main:
        barrier(ctx)  # leave the process group together with rank 0: a lone teardown can abort gloo
        shutdown(ctx)
        return {"run": {"world_size": ctx.world_size, "ranks": [rank_stats]}}  # no "images": rank 0 merges
    written = sum(stats["images_written"] for stats in gathered)
    sampled = sum(stats["samples_generated"] for stats in gathered)
    sampling_seconds = max(stats["sampling_time_s"] for stats in gathered)  # the ranks ran in parallel
    preview = write_preview(out, plan.class_keys, config.ipc)
    wall = time.perf_counter() - started
    manifest = build_manifest(plan, written, sampled, sampling_seconds, wall, preview is not None)
    manifest["run"].update(world_size=ctx.world_size, ranks=gathered, batch_size=batch_size)
    write_json_atomic(os.path.join(out, MANIFEST_NAME), manifest)
    barrier(ctx)
    shutdown(ctx)
    return manifest


def build_manifest(plan: Plan, written: int, sampled: int, sampling_seconds: float, wall: float, has_preview: bool) -> dict:
    """The manifest: deterministic fields (settings, classes, images) plus this run's timings."""
    config = plan.config
    settings = {
        key: value for key, value in dataclasses.asdict(config).items()
        if key not in ("progress", "force", "prior_class_names")
    }
    settings.update(composite=plan.composite, beta=plan.beta, beta_source=plan.beta_source)
    for key in ("ve", "prior", "diffusers", "beta_table", "out"):
        if settings.get(key):
            settings[key] = os.path.abspath(settings[key])
    images = []
    for job in plan.jobs:
        images.append({
            "path": job.relative_path,
            "class": job.class_key,
            "label": job.label,
            "prior_label": plan.prior_labels[plan.class_keys.index(job.class_key)],
            "index": job.image_index,
            "seeds": [sample.seed for sample in job.samples],
            "generated_indices": [sample.generated_index for sample in job.samples],
        })
    return {
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "pixel_settings": plan.pixel_settings,
        "prior": {
            "kind": plan.prior.kind, "path": plan.prior.path, "preset": plan.prior.preset,
            "conditional": plan.prior.class_names is not None,
            "num_classes": None if plan.prior.class_names is None else len(plan.prior.class_names),
        },
        "ve": {
            "path": os.path.abspath(config.ve), "arch": plan.ve.arch, "resolution": plan.ve.resolution,
            "tau": plan.ve.tau, "num_classes": plan.ve.num_classes,
        },
        "classes": [
            {"name": key, "folder": key, "label": label, "prior_label": prior_label}
            for key, label, prior_label in zip(plan.class_keys, plan.ve_labels, plan.prior_labels)
        ],
        "label_convention": "label = position of the class in the VE's class list; prior_label = its index "
                            "in the prior's class list (null: unconditional prior)",
        "images": images,
        "preview": PREVIEW_NAME if has_preview else None,
        "versions": _versions(),
        "run": {
            "device": str(plan.device),
            "threads": torch.get_num_threads(),
            "wall_time_s": round(wall, 3),
            "sampling_time_s": round(sampling_seconds, 3),
            "images_written": written,
            "samples_generated": sampled,
            "images_per_s": round(written / sampling_seconds, 4) if sampling_seconds > 0 else None,
            "samples_per_s": round(sampled / sampling_seconds, 4) if sampling_seconds > 0 else None,
            "finished_unix_time": round(time.time(), 3),
        },
    }


# ---- command line ---------------------------------------------------------------------------------


def add_distill_parser(subparsers) -> None:
    """Declare `igds-fast distill` (sets handler=run_distill)."""
    from .models.adm import ADM_PRESETS

    parser = subparsers.add_parser(
        "distill",
        help="sample a distilled image folder with IGDS (no arguments: the built-in digits demo)",
        description=(
            "Sample IPC images per class with information-guided diffusion sampling and write "
            "OUT/<class>/<index>.png, OUT/manifest.json and OUT/preview.png. Reruns resume. "
            "Without --prior/--diffusers/--ve (or with --preset digits) it runs the built-in "
            "scikit-learn digits pipeline: train a small prior and VE (cached in --work-dir), "
            "distill IPC 1 and 10, evaluate, and print a table."
        ),
    )
    source = parser.add_argument_group("models")
    source.add_argument("--prior", help="ADM checkpoint (.pt/.safetensors, with --preset) or a prior file from train_prior")
    source.add_argument("--preset", choices=sorted(ADM_PRESETS) + ["digits"],
                        help="architecture of an ADM --prior checkpoint; 'digits' runs the built-in demo")
    source.add_argument("--diffusers", metavar="DIR", help="a local diffusers UNet2DModel folder")
    source.add_argument("--noise-schedule", choices=("linear", "cosine"), default="linear",
                        help="diffusion of a --diffusers prior (default: linear)")
    source.add_argument("--ve", help="variational estimator bundle (.safetensors)")
    what = parser.add_argument_group("what to sample")
    what.add_argument("--classes", help="imagewoof | imagenette | imagenet100 | imagenet1k | FILE | indices like 0-9,17 "
                                        "(default: every VE class)")
    what.add_argument("--ipc", type=int, default=None, help="images per class (required, except for the digits demo)")
    what.add_argument("--composite", type=int, choices=COMPOSITE_SIZES, default=None,
                      help="samples per image: 4 = 2x2 composite (default for ADM presets), 1 = one sample")
    what.add_argument("--seed", type=int, default=0, help="global seed; image seeds derive from (seed, class, index)")
    guidance = parser.add_argument_group("guidance")
    guidance.add_argument("--beta", type=float, default=None, help="weight of the contextual term")
    guidance.add_argument("--beta-table", default=None, help="beta per IPC from calibrate-beta (JSON)")
    guidance.add_argument("--scale", type=float, default=None, help=f"guidance scale (default: {DEFAULT_SCALE}; 0 = plain DDPM)")
    guidance.add_argument("--steps", type=int, default=None, help=f"respaced sampling steps (default: {DEFAULT_STEPS})")
    guidance.add_argument("--tau", type=float, default=None, help="feature-softmax temperature (default: the VE's)")
    guidance.add_argument("--gamma", type=float, default=0.0, help="diversity (InfoNCE) term weight (default: 0)")
    guidance.add_argument("--mode", choices=("x0", "xt"), default="x0", help="gradient w.r.t. x0_hat or x_t")
    guidance.add_argument("--head", choices=("autograd", "analytic", "triton"), default="autograd")
    guidance.add_argument("--noise", choices=("torch", "philox"), default=None,
                          help="noise source (default: philox for --backend compiled, else torch)")
    guidance.add_argument("--backend", choices=("eager", "compiled"), default="eager",
                          help="eager: the float32 reference; compiled: low-precision torch.compile'd UNet, "
                               "Triton guidance kernels, the step replayed as one CUDA graph")
    guidance.add_argument("--compile-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                          help="compiled backend: compute dtype of the UNet and encoder copies (default: bf16)")
    guidance.add_argument("--compile-options", metavar="JSON", default=None,
                          help='compiled backend: more CompileConfig fields, e.g. \'{"cuda_graphs": false, '
                               '"mode": "default"}\'')
    guidance.add_argument("--batch-invariant", action="store_true",
                          help="eager: step each image alone so its bytes do not depend on the batch size either "
                               "(slower; without it, bytes are identical across world sizes and resumes at one batch size)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=None,
                     help=f"samples per batch (default: {DEFAULT_BATCH_SIZE}; compiled backend: chosen from free "
                          "device memory; digits demo: 100)")
    run.add_argument("--out", default=None, help="output folder")
    run.add_argument("--force", action="store_true", help="clear an output folder of another configuration")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    demo = parser.add_argument_group("digits demo (--preset digits or no models)")
    demo.add_argument("--work-dir", default=None, help="cache of the demo's trained pieces and outputs (default: ./igds_work/digits)")
    demo.add_argument("--eval-seeds", type=int, default=None, help="evaluation seeds per method (default: 3)")
    demo.add_argument("--fast", action="store_true", help="tiny settings (smoke test; numbers are meaningless)")
    parser.set_defaults(handler=run_distill)


def _uses_digits_demo(args: argparse.Namespace) -> bool:
    models_given = any(getattr(args, name) for name in ("prior", "diffusers", "ve"))
    if args.preset == "digits":
        if models_given:
            raise IGDSInputError("--preset digits trains its own prior and VE; drop --prior/--diffusers/--ve")
        return True
    if not models_given:
        if args.preset:
            raise IGDSInputError(f"--preset {args.preset} needs --prior CHECKPOINT and --ve BUNDLE")
        return True
    return False


def _compile_options(args: argparse.Namespace) -> dict | None:
    """--compile-options JSON merged with --compile-dtype (None when neither is given)."""
    options: dict = {}
    if args.compile_options is not None:
        try:
            options = json.loads(args.compile_options)
        except json.JSONDecodeError as exc:
            raise IGDSInputError(f"--compile-options is not valid JSON: {exc.msg} at character {exc.pos}") from None
        if not isinstance(options, dict):
            raise IGDSInputError("--compile-options must be a JSON object of CompileConfig fields")
    if args.compile_dtype is not None:
        options["dtype"] = args.compile_dtype
    return options or None


def run_distill(args: argparse.Namespace) -> int:
    """The `distill` subcommand: the digits demo or one distillation run. Returns the exit code."""
    if _uses_digits_demo(args):
        from .presets.digits import run_digits_cli

        return run_digits_cli(args)
    if not args.ve:
        raise IGDSInputError("give --ve BUNDLE (the variational estimator)")
    if args.ipc is None:
        raise IGDSInputError("give --ipc (images per class)")
    if not args.out:
        raise IGDSInputError("give --out OUT (the output folder)")
    config = DistillConfig(
        ve=args.ve, out=args.out, ipc=args.ipc, prior=args.prior, preset=args.preset, diffusers=args.diffusers,
        classes=args.classes, beta=args.beta, beta_table=args.beta_table,
        scale=DEFAULT_SCALE if args.scale is None else args.scale,
        steps=DEFAULT_STEPS if args.steps is None else args.steps,
        composite=args.composite,
        batch_size=args.batch_size, seed=args.seed, force=args.force,
        device=args.device, tau=args.tau, gamma=args.gamma, mode=args.mode, head=args.head, noise=args.noise,
        backend=args.backend, noise_schedule=args.noise_schedule, progress=not args.quiet,
        batch_invariant=args.batch_invariant, compile_options=_compile_options(args),
    )
    manifest = distill(config)
    if "images" not in manifest:
        return 0  # a non-zero torchrun rank: rank 0 merges the manifest and reports the run
    run = manifest["run"]
    rate = f", {run['images_per_s']:.3f} images/s" if run["images_per_s"] else ""
    print(f"distill: {len(manifest['images'])} images in {os.path.abspath(config.out)} "
          f"({run['images_written']} written this run in {run['wall_time_s']:.1f}s{rate})")
    return 0


def main(argv=None) -> int:
    """`python -m igds_fast.distill ...`: the distill command on its own (same arguments and errors)."""
    from .cli import main as cli_main

    return cli_main(["distill", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
