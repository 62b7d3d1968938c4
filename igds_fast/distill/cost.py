"""What a distillation will cost, before it runs: samples, steps, FLOPs, disk and an estimated time.

`igds-fast distill ... --plan` prints it and stops; every run logs the same lines before it samples.
No model work: the prior, the VE encoder and a VAE decoder are built on the meta device from their
declared architectures and counted there (igds_fast/models/flops.py, the counting of
bench/model_stats.py: matrix products and convolutions, a multiply-add = 2 FLOPs, batch 1).

FLOPs of one sample (one diffusion sample; a 2x2 composite image is 4 of them):

    steps x prior forward                      (a DiT under classifier-free guidance: [x; x])
  + guided steps x ( VE encoder forward + its input-gradient backward + the head (4 d C)
                     [mode xt: + the prior's input-gradient backward]
                     [latent prior: + the VAE decoder's forward and input-gradient backward] )
  + [latent prior: one final decode]

S³ (--select s3): its G x IPC candidates per class cost the same per sample; the selection adds one
feature-encoder forward per candidate image and per real image of the centroids (`selection_cost`).

Disk: a PNG is at most its uncompressed size plus the filter bytes and headers (C x H x W + H +
PNG_OVERHEAD bytes; natural images compress below it), the manifest MANIFEST_BYTES_PER_IMAGE per
image plus its header, the preview at most 20 x 10 images; S³ adds its candidates folder (the same
bound) and their features (d float32 each).

Time on the device at hand, from the first source that has it:
 1. measured: a previous run's manifest (OUT's own, or --timing-from DIR) on the same device with the
    same timing settings (`timing_key`): its sampling seconds per sample-step, times this run's;
 2. recorded: igds_fast/data/throughput.json (rates measured by bench/ on a GPU, from bench/RESULTS.md;
    it holds none until a GPU has run them);
 3. estimate: the counted FLOPs at EFFICIENCY of the device's peak in the run's compute dtype (NVIDIA's
    dense datasheet peaks for H100 / H200 / A100; on a CPU a float32 matmul timed here), labelled as an
    estimate.
Under torchrun (WORLD_SIZE ranks) the samples, FLOPs and time are also given per rank: the fixed
batches are dealt round-robin, about 1 / WORLD_SIZE of the work each.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources

import torch

from ..diffusion import ScheduleConfig, space_timesteps
from ..errors import IGDSInputError
from ..jobs import is_done
from ..limits import format_bytes, free_disk_bytes, read_json
from ..throughput import device_name, flop_time, format_flops, format_hours
from ..models.adm import ADM_PRESETS, ADMUNet
from ..models.flops import counted_flops, input_backward_flops, resnet_forward_flops
from ..models.priors import read_prior_header
from ..models.resnet import FEATURE_DIMS, build_resnet
from ..preprocess import EncoderPreprocess
from .folder import MANIFEST_NAME, PREVIEW_MAX_CLASSES, PREVIEW_MAX_IMAGES
from .owned import CONFIG_NAME
from .plan import Plan

PNG_OVERHEAD = 1024  # signature, IHDR, IDAT / IEND chunk headers, zlib's framing (bytes)
MANIFEST_BYTES_PER_IMAGE = 520  # one entry of manifest.json's "images" (measured: 4 seeds, indent 2)
MANIFEST_HEADER_BYTES = 64 << 10  # settings, versions, classes (~170 bytes each), run record
RECORDS_FILE = "throughput.json"


@dataclass(frozen=True)
class SampleFlops:
    """FLOPs of the parts of one sample's work (module docstring); None = could not be counted."""

    prior: int  # one forward as the sampler calls it (CFG included)
    prior_backward: int  # mode xt: its input gradient; 0 in mode x0
    guidance: int  # VE encoder forward + input-gradient backward + head
    decoder: int  # latent prior: decoder forward + input-gradient backward per guided step; else 0
    final_decode: int  # latent prior: one decoder forward per sample; else 0
    prior_name: str
    encoder_name: str

    def per_sample(self, steps: int, guided: int) -> int:
        return steps * self.prior + guided * (self.prior_backward + self.guidance + self.decoder) + self.final_decode


@dataclass
class TimeEstimate:
    seconds: float
    source: str  # "measured" | "recorded" | "estimate"
    detail: str


@dataclass
class RunCost:
    """The numbers `cost_lines` prints (see the module docstring)."""

    what: str  # "distill" or "distill (S3 candidates)"
    classes: int
    images_per_class: int
    composite: int
    images: int
    done: int
    steps: int
    guided_steps: int
    flops: SampleFlops
    device: str
    world_size: int
    disk: dict = field(default_factory=dict)  # part -> bytes
    out: str = ""
    time: TimeEstimate | None = None
    extra_flops: dict = field(default_factory=dict)  # S³'s selection stages: part -> FLOPs

    @property
    def samples(self) -> int:
        return self.images * self.composite

    @property
    def samples_to_make(self) -> int:
        return (self.images - self.done) * self.composite

    @property
    def per_sample_flops(self) -> int:
        return self.flops.per_sample(self.steps, self.guided_steps)

    @property
    def total_flops(self) -> int:
        return self.samples * self.per_sample_flops + sum(self.extra_flops.values())


# ---- FLOPs ----------------------------------------------------------------------------------------


def _meta_prior(plan: Plan):
    """The prior as the sampler calls it, on the meta device: (module, its input example, t, y, name)."""
    spec = plan.prior
    with torch.device("meta"):
        if spec.kind in ("adm", "igds"):
            flags = ADM_PRESETS[spec.preset] if spec.kind == "adm" else read_prior_header(spec.path)["flags"]
            model = ADMUNet.from_flags(**{**flags, "dropout": 0.0})
            name = spec.preset or "ADM (train-prior)"
        elif spec.kind == "dit":
            from ..models.cfg import ClassifierFreeGuidance
            from ..models.dit import DiT

            latent = plan.pixel_settings["latent"]
            model = ClassifierFreeGuidance(DiT(**spec.flags), latent["cfg_scale"], latent["cfg_channels"])
            name = f"DiT ({spec.preset or 'from its checkpoint'}), CFG scale {latent['cfg_scale']:g}"
        else:
            from diffusers import UNet2DModel

            from ..models.diffusers_unet import DiffusersUNetPrior

            config = read_json(os.path.join(spec.path, "config.json"), "diffusers config")
            unet = UNet2DModel.from_config(config)
            abar = None if spec.prediction_type == "epsilon" else torch.ones(int(spec.schedule.get("diffusion_steps", 1000)))
            model = DiffusersUNetPrior(unet, spec.prediction_type, abar)
            name = "diffusers UNet2DModel"
        model = model.to("meta").eval().requires_grad_(False)
        size, channels = model.image_size, model.in_channels
        x = torch.randn(1, channels, size, size)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if getattr(model, "num_classes", None) else None
    return model, x, t, y, name


def _meta_decoder(vae_dir: str):
    from diffusers import AutoencoderKL

    from ..models.vae import LatentDecoder

    if not os.path.isfile(os.path.join(vae_dir, "config.json")):
        vae_dir = os.path.join(vae_dir, "vae")
    config = read_json(os.path.join(vae_dir, "config.json"), "VAE config")
    with torch.device("meta"):
        return LatentDecoder(AutoencoderKL.from_config(config)).to("meta")


def _no_grad_flops(run) -> int:
    def counted():
        with torch.no_grad():
            run()
    return counted_flops(counted)[0]


def guidance_flops(ve, image_shape: tuple[int, int, int]) -> tuple[int, str]:
    """(FLOPs, description) of the VE's guidance on one image [C, S, S]: encoder forward + input-gradient
    backward (after its preprocessing to its resolution) + the head's forward and backward (4 d C)."""
    with torch.device("meta"):
        encoder = build_resnet(ve.arch, num_classes=None, in_channels=ve.encoder.in_channels).eval()
        encoder.requires_grad_(False)
        preprocess = EncoderPreprocess(ve.resolution, ve.preprocess.mean, ve.preprocess.std)
        image = torch.randn(1, *image_shape)

    def features(x):
        return encoder.forward_features(preprocess(x))

    forward = _no_grad_flops(lambda: features(image))
    backward, _ = input_backward_flops(features, image)
    head = 4 * ve.feature_dim * ve.num_classes
    return forward + backward + head, f"{ve.arch} at {ve.resolution} px"


def sample_flops(plan: Plan) -> SampleFlops:
    """Count the parts of one sample's work for this plan on the meta device (module docstring)."""
    model, x, t, y, name = _meta_prior(plan)
    prior = _no_grad_flops(lambda: model(x, t, y))
    prior_backward = input_backward_flops(lambda v: model(v, t, y), x)[0] if plan.guidance.mode == "xt" else 0
    decoder_flops = final_decode = 0
    image_shape = tuple(x.shape[1:])
    if plan.pixel_settings.get("latent") is not None:
        decoder = _meta_decoder(os.path.abspath(plan.config.models.vae))
        final_decode = _no_grad_flops(lambda: decoder(x))
        decoder_flops = final_decode + input_backward_flops(decoder, x)[0]
        image_shape = (decoder.out_channels, x.shape[2] * decoder.scale_factor, x.shape[3] * decoder.scale_factor)
    guidance, encoder_name = guidance_flops(plan.ve, image_shape)
    return SampleFlops(prior, prior_backward, guidance, decoder_flops, final_decode, name, encoder_name)


def output_image_shape(plan: Plan) -> tuple[int, int, int]:
    """[C, S, S] of one output image (a composite has its samples' side)."""
    spec = plan.prior
    if spec.kind == "dit":
        side = int(spec.flags["input_size"])
        vae_dir = os.path.abspath(plan.config.models.vae)
        if not os.path.isfile(os.path.join(vae_dir, "config.json")):
            vae_dir = os.path.join(vae_dir, "vae")
        config = read_json(os.path.join(vae_dir, "config.json"), "VAE config")
        return int(config.get("out_channels", 3)), side * 2 ** (len(config["block_out_channels"]) - 1), \
            side * 2 ** (len(config["block_out_channels"]) - 1)
    return tuple(int(v) for v in plan.work.sample_shape)  # a pixel prior's sample is the image


def png_bound(shape: tuple[int, int, int]) -> int:
    """The most bytes one PNG of [C, H, W] uint8 takes (uncompressed size + filter bytes + headers)."""
    channels, height, width = shape
    return channels * height * width + height + PNG_OVERHEAD


def preview_bound(plan: Plan, shape: tuple[int, int, int]) -> int:
    """The preview's bound: one row per class (at most 20) of at most 10 images, 2 px padding."""
    rows, columns = min(len(plan.class_keys), PREVIEW_MAX_CLASSES), min(plan.config.job.ipc, PREVIEW_MAX_IMAGES)
    channels, height, width = shape
    return png_bound((channels, rows * (height + 2) + 2, columns * (width + 2) + 2))


def guided_steps(plan: Plan) -> tuple[int, int]:
    """(steps, guided steps) of the plan's respaced loop."""
    diffusion = plan.pixel_settings["diffusion"]
    schedule = ScheduleConfig(**diffusion)
    steps = len(space_timesteps(schedule.diffusion_steps, schedule.sampling_steps))
    return steps, sum(1 for i in range(steps) if plan.guidance.guides(i, steps))


# ---- time -------------------------------------------------------------------------------------------


def compute_dtype(plan: Plan) -> str:
    """The dtype the prior computes in: fp32 for the eager and fused backends, the compile dtype otherwise."""
    return plan.pixel_settings.get("compile", {}).get("dtype", "fp32") if plan.config.backend.name == "compiled" else "fp32"


def timing_key(settings: dict) -> dict:
    """What a measured rate depends on (of a folder's pixel settings): the models, the loop and the backend."""
    keys = ("prior_kind", "prior_preset", "diffusion", "mode", "head", "backend", "compile", "latent", "sampler",
            "eta", "guide_window", "composite", "ve_fingerprint")
    key = {name: settings.get(name) for name in keys}
    key["guided"] = bool(settings.get("scale"))
    if settings.get("prior_preset") is None:
        key["prior_fingerprint"] = settings.get("prior_fingerprint")
    return key


def _measured(plan: Plan, folder: str, name: str) -> tuple[float, str] | None:
    """(seconds per sample-step, detail) from `folder`'s manifest when it matches this run and device."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        manifest = read_json(path, "manifest")
        settings, run = manifest["pixel_settings"], manifest["run"]
        if timing_key(settings) != timing_key(plan.pixel_settings):
            return None
        their_device = manifest["versions"].get("gpu") or str(run["device"]).split(":")[0]
        if their_device != name:
            return None
        ranks = run.get("ranks") or [run]
        seconds = max(float(r["sampling_time_s"]) for r in ranks)
        samples = sum(int(r["samples_generated"]) for r in ranks) / len(ranks)
        steps = len(space_timesteps(ScheduleConfig(**settings["diffusion"]).diffusion_steps,
                                    ScheduleConfig(**settings["diffusion"]).sampling_steps))
    except (KeyError, TypeError, ValueError, IGDSInputError):
        return None
    if samples <= 0 or seconds <= 0:
        return None
    per = seconds / (samples * steps)
    return per, (f"measured: {folder}'s run, {per * 1e3:.3g} ms per sample-step per rank on {name}, batch "
                 f"{run.get('batch_size')}")


def throughput_records() -> list[dict]:
    """The rates shipped in igds_fast/data/throughput.json (see its note)."""
    with resources.files("igds_fast.data").joinpath(RECORDS_FILE).open("r", encoding="utf-8") as handle:
        return list(json.load(handle)["records"])


def _recorded(plan: Plan, name: str, records: list[dict]) -> tuple[float, str] | None:
    dtype = compute_dtype(plan)
    for record in records:
        if (record.get("device") == name and record.get("prior_preset") == plan.prior.preset
                and record.get("backend") == plan.config.backend.name and record.get("dtype") == dtype
                and bool(record.get("guided", True)) == bool(plan.guidance.scale)):
            per = float(record["seconds_per_sample_step"])
            return per, (f"recorded: {per * 1e3:.3g} ms per sample-step on {name} at batch {record.get('batch')} "
                         f"({record.get('source', 'igds_fast/data/throughput.json')})")
    return None


def estimate_time(plan: Plan, cost: RunCost, timing_from: str | None, records: list[dict] | None = None) -> TimeEstimate | None:
    """The time the samples still to make take on this device, per rank (module docstring, sources 1-3)."""
    name = device_name(plan.device)
    sample_steps = cost.samples_to_make * cost.steps / cost.world_size
    for folder in [timing_from, plan.config.run.out]:
        found = _measured(plan, folder, name) if folder else None
        if found is not None:
            return TimeEstimate(found[0] * sample_steps, "measured", found[1])
    found = _recorded(plan, name, throughput_records() if records is None else records)
    if found is not None:
        return TimeEstimate(found[0] * sample_steps, "recorded", found[1])
    seconds, label = flop_time(cost.samples_to_make * cost.per_sample_flops / cost.world_size, plan.device,
                               compute_dtype(plan))
    return None if seconds is None else TimeEstimate(seconds, "estimate", label)


# ---- the whole run ---------------------------------------------------------------------------------


def done_images(plan: Plan) -> int:
    """Images OUT already holds for this configuration (0 when it holds another one or nothing)."""
    out = plan.config.run.out
    try:
        saved = read_json(os.path.join(out, CONFIG_NAME), "settings file") if os.path.isdir(out) else None
    except IGDSInputError:
        return 0
    if saved != json.loads(json.dumps(plan.pixel_settings)):
        return 0
    return sum(1 for job in plan.jobs if is_done(job, out))


def world_size() -> int:
    """Ranks of this run: torchrun's WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def distill_cost(plan: Plan, world: int | None = None, done: int | None = None, timing_from: str | None = None,
                 what: str = "distill", records: list[dict] | None = None) -> RunCost:
    """The cost of the plan's run (module docstring). world: ranks (None: WORLD_SIZE); done: images
    already made (None: counted in OUT)."""
    steps, guided = guided_steps(plan)
    images = len(plan.jobs)
    shape = output_image_shape(plan)
    cost = RunCost(what, len(plan.class_keys), plan.config.job.ipc, plan.composite, images,
                   done_images(plan) if done is None else done, steps, guided, sample_flops(plan),
                   device_name(plan.device), world or world_size(), out=os.path.abspath(plan.config.run.out))
    cost.disk = {
        f"{images:,} PNGs of {shape[0]}x{shape[1]}x{shape[2]}": images * png_bound(shape),
        "manifest and preview": MANIFEST_HEADER_BYTES + images * MANIFEST_BYTES_PER_IMAGE + preview_bound(plan, shape),
    }
    cost.time = estimate_time(plan, cost, timing_from, records)
    return cost


def selection_cost(candidate_plan: Plan, ipc: int, encoder_description: dict, real_images: int,
                   world: int | None = None, done: int | None = None, timing_from: str | None = None,
                   records: list[dict] | None = None) -> RunCost:
    """A --select s3 run: its candidates' run (G x IPC per class) plus the selection's encoder forwards
    (one per candidate image, one per real image of the centroids) and the output folder's IPC per class."""
    cost = distill_cost(candidate_plan, world, done, timing_from, "S3 candidates (G x IPC per class)", records)
    shape = output_image_shape(candidate_plan)
    ve = candidate_plan.ve
    if encoder_description.get("kind") == "ve":
        arch, resolution, channels = ve.arch, ve.resolution, ve.encoder.in_channels
    else:
        arch, resolution, channels = encoder_description["arch"], encoder_description["resolution"], 3
    per_image = resnet_forward_flops(arch, channels, resolution, shape)
    cost.extra_flops = {f"S3 features of the {cost.images:,} candidates": cost.images * per_image,
                        f"S3 real centroids ({real_images:,} images)": real_images * per_image}
    dim = FEATURE_DIMS[arch]
    outputs = cost.classes * ipc
    cost.disk = {
        f"{cost.images:,} candidate PNGs of {shape[0]}x{shape[1]}x{shape[2]}": cost.images * png_bound(shape),
        "candidate features": cost.images * dim * 4 + 2 * cost.classes * dim * 4,
        f"{outputs:,} output PNGs": outputs * png_bound(shape),
        "manifests and previews": 2 * (MANIFEST_HEADER_BYTES + preview_bound(candidate_plan, shape))
        + (cost.images + outputs) * MANIFEST_BYTES_PER_IMAGE,
    }
    return cost


def cost_lines(cost: RunCost, prefix: str = "distill: plan:") -> list[str]:
    """The lines `--plan` prints and every run logs before it samples."""
    flops = cost.flops
    composite = "" if cost.composite == 1 else f" ({cost.composite} samples per image: 2x2 composites)"
    what = "" if cost.what == "distill" else f"{cost.what}: "
    lines = [f"{prefix} {what}{cost.classes:,} classes x {cost.images_per_class:,} images = {cost.images:,} "
             f"images{composite} = {cost.samples:,} samples x {cost.steps} steps ({cost.guided_steps} guided)"]
    parts = [f"{format_flops(cost.steps * flops.prior)} prior ({flops.prior_name}: {format_flops(flops.prior)} per forward)"]
    if flops.prior_backward:
        parts.append(f"{format_flops(cost.guided_steps * flops.prior_backward)} prior input-gradient (mode xt)")
    if flops.decoder or flops.final_decode:
        parts.append(f"{format_flops(cost.guided_steps * flops.decoder + flops.final_decode)} decoder (forward + input "
                     "gradient per guided step, one final decode)")
    parts.append(f"{format_flops(cost.guided_steps * flops.guidance)} guidance (VE {flops.encoder_name}: "
                 f"{format_flops(flops.guidance)} per guided step)")
    lines.append(f"{prefix} per sample {format_flops(cost.per_sample_flops)} = " + " + ".join(parts))
    total = f"{prefix} total {format_flops(cost.total_flops)} ({cost.total_flops:.4g} FLOP, multiply-add = 2)"
    if cost.extra_flops:
        total += "; of which " + ", ".join(f"{name} {format_flops(value)}" for name, value in cost.extra_flops.items())
    lines.append(total)
    disk = sum(cost.disk.values())
    free = free_disk_bytes(cost.out)
    lines.append(f"{prefix} disk at most {format_bytes(disk)} (" + ", ".join(f"{name} {format_bytes(size)}" for name, size
                                                                         in cost.disk.items())
                 + (f"); {format_bytes(free)} free at {cost.out}" if free is not None else ")"))
    to_make = f"{cost.samples_to_make:,} samples to make" + (f" ({cost.done:,} images done)" if cost.done else "")
    per_rank = ""
    if cost.world_size > 1:
        share = math.ceil(cost.samples_to_make / cost.world_size)
        per_rank = (f" per rank ({cost.world_size} ranks: ~{share:,} samples, "
                    f"{format_flops(cost.samples_to_make * cost.per_sample_flops / cost.world_size)} each)")
    if cost.time is None:
        lines.append(f"{prefix} time on {cost.device}: not estimated ({to_make}{per_rank}; no rate measured, "
                     "recorded or known)")
    else:
        label = "~" if cost.time.source == "estimate" else ""
        lines.append(f"{prefix} time on {cost.device}: {label}{format_hours(cost.time.seconds)}{per_rank} for "
                     f"{to_make} ({cost.time.detail})")
    return lines


__all__ = ["RunCost", "SampleFlops", "TimeEstimate", "cost_lines", "distill_cost",
           "estimate_time", "guidance_flops", "png_bound", "sample_flops", "selection_cost", "throughput_records", "timing_key",
           "world_size"]
