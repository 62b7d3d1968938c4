"""Time the whole guided reverse step: eager fp32, eager half, compiled, compiled + CUDA graphs.

    python bench/sampler.py --presets adm256 --batch-sizes 8,32 --check-fidelity --append-results
    python bench/sampler.py --presets tiny                      # CPU smoke run (no graphs on CPU)
    python bench/sampler.py --presets dit-xl2-256 --batch-sizes 16  # the latent prior (DiT + SD's VAE)
    python bench/sampler.py --presets dit-tiny                  # its CPU smoke run

One process, one run, per preset (random weights; zero-initialised ADM output layers re-drawn so
every layer computes): the ADM prior and a ResNet-50 VE (ResNet-18 for `tiny`) with a 10-class head,
guidance scale 1, beta 0.5, x0 mode (the paper's setting), Philox noise. Variants, each at every
batch size:

    eager-fp32   backend="eager" timed with PyTorch's defaults (reference_numerics=False: cuDNN may use
                 TF32 convolutions and benchmark-chosen algorithms) — the faster, conservative
                 baseline; --check-fidelity compares against the true-fp32 deterministic reference
    eager-fp16   the same eager step on fp16 copies of the UNet and the encoder (guided-diffusion's
                 use_fp16; bf16 on CPU, where fp16 convolutions are not a fast path)
    compiled     backend="compiled" (CompileConfig defaults, overridable) with graphs switched off
    graphs       the same CompiledStep object replaying its CUDA graph (GPU only)

Timing: `--warmup` steps first (they include torch.compile, autotuning and graph capture: their
wall time is reported as "warm-up s"), then `--steps` guided steps timed as one block between device
synchronisations; seconds per image at 250 steps = (block time / steps) * 250 / batch — scaled from
the timed steps, not a measured 250-step run (every step of the paper's setting has the same cost).
FLOPs per image per step come from torch.utils.flop_counter on the meta device: one UNet forward
plus one encoder forward and input-gradient backward (convolutions and matmuls; the head and the
elementwise update are < 0.01% and not counted). Peak: a bf16 matmul 8192^3 measured in the same
run (1024^3 on CPU). Memory: peak allocated above the variant's starting allocation (its
activations, workspaces and graph pool; weights excluded). Ratios compare variants at the same batch.

Latent presets (dit-xl2-256: DiT-XL/2 + SD's VAE decoder (sd-vae-ft-mse's AutoencoderKL config) + a
ResNet-50 VE at 224; dit-tiny: a 2-block DiT + a 2-level AutoencoderKL + ResNet-18 at 16 px, for CPU):
random weights, the DiT under classifier-free guidance (ClassifierFreeGuidance, scale 4.0 as DiT's
sample.py: every forward runs [x; x]), DiT's schedule (linear, 1000 betas, learned sigma) respaced to
50 steps, IGDS scale 1, beta 0.5, x0 not clipped (a latent). Every variant is timed guided (IGDS:
CFG forward + decoder forward + VE forward/backward + decoder backward) and unguided (scale 0: the
CFG forward and the DDPM update only) — the same sampler objects, the guidance scale switched in their
StepContext, so the compiled variants compile once; s/image is at 50 steps. "decoder fwd+bwd ms": the
variant's own decoder (fp32 / half copy / compiled copy) timed alone at the step's batch, forward and
input-gradient backward (torch.autograd.grad w.r.t. the latent), between device synchronisations
(not graph-captured: for the graphs rows it is the compiled decoder's time without graphs);
"decoder share" = that over the guided step's time. FLOPs per image per step from
bench/model_stats.py's latent_step_stats (FlopCounterMode on meta): guided = CFG DiT forward +
decoder forward + encoder forward + encoder and decoder input-gradient backward; unguided = the CFG
DiT forward.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run interpreted on CPU

import torch.nn as nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from igds_fast.sampling.compiled import CompiledStep, low_precision_copy  # noqa: E402
from igds_fast.guidance import GuidanceConfig  # noqa: E402
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig  # noqa: E402
from igds_fast.models.adm import ADM_DIFFUSION_FLAGS, ADM_PRESETS, ADMUNet  # noqa: E402
from igds_fast.models.cfg import ClassifierFreeGuidance  # noqa: E402
from igds_fast.models.dit import DIT_PRESETS, DiT  # noqa: E402
from igds_fast.models.resnet import build_resnet  # noqa: E402
from igds_fast.preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess  # noqa: E402
from igds_fast.profiling import nvtx_range  # noqa: E402
from igds_fast.sampling import Sampler, fp32_reference_math  # noqa: E402
from igds_fast.seeding import INITIAL_NOISE_STREAM  # noqa: E402
from igds_fast.models.vae import SD_VAE_SCALING_FACTOR, LatentDecoder  # noqa: E402
from igds_fast.ve import VariationalEstimator  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCH, "RESULTS.md")


def _load_model_stats():
    """bench/model_stats.py as a module (this script also runs loaded by path, without bench/ on sys.path)."""
    spec = importlib.util.spec_from_file_location("igds_bench_model_stats", os.path.join(BENCH, "model_stats.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODEL_STATS = _load_model_stats()
DEVICE = torch.device("cuda" if GPU else "cpu")
STEPS_PER_IMAGE = 250
VE_CLASSES = 10
TINY_FLAGS = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), learn_sigma=True,
    class_cond=True, attention_resolutions="8", num_head_channels=16, use_scale_shift_norm=True,
    resblock_updown=True,
)
PRESETS = {  # bench name -> (ADM flags, ADM_DIFFUSION_FLAGS key, VE arch)
    "tiny": (TINY_FLAGS, "adm64-cond", "resnet18"),
    "adm64": (ADM_PRESETS["adm64-cond"], "adm64-cond", "resnet50"),
    "adm128": (ADM_PRESETS["adm128-cond"], "adm128-cond", "resnet50"),
    "adm256": (ADM_PRESETS["adm256-cond"], "adm256-cond", "resnet50"),
}
# The latent prior: bench name -> (DiT flags, diffusers AutoencoderKL config, VE arch).
DIT_TINY_FLAGS = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=1000)
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
    norm_num_groups=8, sample_size=16, scaling_factor=SD_VAE_SCALING_FACTOR,
)
LATENT_PRESETS = {
    "dit-tiny": (DIT_TINY_FLAGS, TINY_VAE_CONFIG, "resnet18"),
    "dit-xl2-256": (DIT_PRESETS["dit-xl2-256"], MODEL_STATS.sd_vae_config(256), "resnet50"),
}
LATENT_STEPS_PER_IMAGE = 50
CFG_SCALE = MODEL_STATS.CFG_SCALE  # 4.0, DiT's sample.py default
DEFAULT_BATCHES = {"tiny": (2, 4), "adm64": (16, 64), "adm128": (16, 32), "adm256": (8, 32),
                   "dit-tiny": (2, 4), "dit-xl2-256": (8, 32)}
VARIANTS = ("eager-fp32", "eager-half", "compiled", "graphs")
GUIDANCE_MODES = ("igds", "none")  # latent presets: guided and unguided rows (ADM presets: guided only)
# Acceptance targets (the issue's; never loosened here): (preset, what, limit).
TARGET_S_PER_IMAGE_ADM256 = 1.05
TARGET_SPEEDUP_VS_EAGER_FP32 = 8.0
TARGET_SPEEDUP_VS_EAGER_HALF = 2.0
TARGET_GRAPHS_VS_COMPILED_ADM64_B64 = 2.0


# ---- models ---------------------------------------------------------------------------------------
def redraw_zero_layers_(model: nn.Module) -> nn.Module:
    """Re-initialise layers that ADM zero-initialises (output convs), so random weights do real work."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) and weight is not None and not weight.any():
            module.reset_parameters()
    return model


def build_prior(preset: str, device) -> ADMUNet:
    flags = PRESETS[preset][0]
    with torch.device(device):
        unet = ADMUNet.from_flags(**{**flags, "dropout": 0.0})
    return redraw_zero_layers_(unet).eval().requires_grad_(False)


def ve_resolution(image_size: int) -> int:
    return min(224, image_size)


def build_ve(preset: str, image_size: int, device) -> VariationalEstimator:
    """The preset's VE (10 classes, random head) for images of side `image_size` (a latent preset: decoded)."""
    arch = (PRESETS[preset] if preset in PRESETS else LATENT_PRESETS[preset])[2]
    with torch.device(device):
        encoder = build_resnet(arch, num_classes=None, softplus_beta=3.0)
        dim = encoder.feature_dim
        weight = torch.randn(VE_CLASSES, dim) / math.sqrt(dim) * 4
        bias = torch.randn(VE_CLASSES) * 0.1
        log_centroids = torch.log_softmax(torch.randn(VE_CLASSES, dim), dim=1)
    preprocess = EncoderPreprocess(ve_resolution(image_size), IMAGENET_MEAN, IMAGENET_STD).to(device)
    names = [f"class{c}" for c in range(VE_CLASSES)]
    return VariationalEstimator(encoder, weight, bias, log_centroids, 1.0, preprocess, names).to(device).eval()


class HalfPrecisionVE:
    """The eager baseline's VE: encoder in half precision, head tensors float32 (VE-shaped object)."""

    def __init__(self, ve: VariationalEstimator, dtype: torch.dtype):
        self.encoder = low_precision_copy(ve.encoder, dtype, channels_last=False)
        self.preprocess, self.dtype = ve.preprocess, dtype
        self.weight, self.bias, self.log_centroids = ve.weight, ve.bias, ve.log_centroids
        self.tau, self.num_classes = ve.tau, ve.num_classes

    def features(self, x):
        return self.encoder.forward_features(self.preprocess(x).to(self.dtype)).float()


def build_latent(preset: str, device) -> tuple[ClassifierFreeGuidance, LatentDecoder]:
    """The latent preset's DiT under classifier-free guidance and its VAE decoder, random weights."""
    from diffusers import AutoencoderKL

    dit_flags, vae_config, _ = LATENT_PRESETS[preset]
    with torch.device(device):
        dit = DiT(**dit_flags)
        vae = AutoencoderKL(**vae_config)
    dit = redraw_zero_layers_(dit.to(device))  # (pos_embed, computed in numpy, on the device too)
    prior = ClassifierFreeGuidance(dit.eval().requires_grad_(False), CFG_SCALE)
    return prior, LatentDecoder(vae.to(device).eval())


class HalfPrecisionPrior(nn.Module):
    """The eager baseline's latent prior: a half-precision copy, input cast in, output float32 out."""

    def __init__(self, prior: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.prior, self.dtype = low_precision_copy(prior, dtype, channels_last=False), dtype
        self.image_size, self.in_channels = prior.image_size, prior.in_channels
        self.learn_sigma, self.num_classes = prior.learn_sigma, prior.num_classes

    def forward(self, x, t, y):
        return self.prior(x.to(self.dtype), t, y).float()


def latent_flops_per_image_step(preset: str) -> dict[str, int]:
    """bench/model_stats.py's counts for one image-step of a latent preset (FLOPs, meta device)."""
    dit_flags, vae_config, arch = LATENT_PRESETS[preset]
    image_size = dit_flags["input_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)
    stats = MODEL_STATS.latent_step_stats(dit_flags, vae_config, arch, CFG_SCALE, ve_resolution(image_size))
    parts = {key: part["flops"] for key, part in stats["parts"].items()}
    return {
        "unet": parts["cfg_dit"], "decoder": parts["decoder_forward"] + parts["decoder_backward"],
        "encoder": parts["encoder_forward"] + parts["encoder_backward"],
        "total": stats["guided"], "unguided": stats["unguided"], **{f"part_{k}": v for k, v in parts.items()},
    }


def flops_per_image_step(preset: str) -> dict[str, int]:
    """UNet forward and encoder forward + input-gradient backward FLOPs for one image (meta device)."""
    flags = PRESETS[preset][0]
    with torch.device("meta"):
        unet = ADMUNet.from_flags(**{**flags, "dropout": 0.0}).eval()
        size = unet.image_size
        x = torch.randn(1, 3, size, size)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if unet.num_classes else None
        encoder = build_resnet(PRESETS[preset][2], num_classes=None).eval().requires_grad_(False)
        preprocess = EncoderPreprocess(ve_resolution(size), IMAGENET_MEAN, IMAGENET_STD)
    counts = {}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, y)
    counts["unet"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        image = x.clone().requires_grad_(True)
        features = encoder.forward_features(preprocess(image))
        # backward(), not autograd.grad: FlopCounterMode's module hooks refuse grad() w.r.t. a leaf.
        features.backward(torch.ones_like(features))
    counts["encoder"] = counter.get_total_flops()
    counts["total"] = counts["unet"] + counts["encoder"]
    return counts


# ---- measurement ----------------------------------------------------------------------------------
def synchronize():
    if GPU:
        torch.cuda.synchronize()


def matmul_peak_tflops(dtype=torch.bfloat16) -> tuple[float, int]:
    """Measured dense matmul throughput (TFLOP/s) and the size n of the n^3 product used."""
    n = 8192 if GPU else 1024
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize()
    repeats = 20 if GPU else 3
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return 2 * n**3 / seconds / 1e12, n


def make_sampler(unet, schedule, ve, class_map, backend="eager", options=None, reference=True, decoder=None) -> Sampler:
    # A latent's x0 prediction is not clipped (DiT's sample.py: clip_denoised=False).
    guidance = GuidanceConfig(scale=1.0, beta=0.5, clip_x0=decoder is None)
    return Sampler(unet, schedule, ve, guidance, backend=backend, prior_class_map=class_map, noise="philox",
                   backend_options=options, reference_numerics=reference,  # (the compiled step ignores it)
                   decoder=decoder)


@contextlib.contextmanager
def guidance_scale(sampler: Sampler, scale: float):
    """The sampler's steps with another guidance scale (0 = unguided), for the block only.

    Every step reads StepContext.config at call time (guided(i), the update's scale), so one sampler
    (one compile) times both; the compiled step captures one graph per (guided or not, noise kind)."""
    context = sampler.context
    saved = context.config
    context.config = dataclasses.replace(saved, scale=scale)
    try:
        yield
    finally:
        context.config = saved


def time_decoder(sampler: Sampler, batch: int, repeats: int) -> float:
    """Seconds of one forward + input-gradient backward of the sampler's guidance decoder at `batch`."""
    decoder = sampler._step.ops.guidance.decoder  # fp32, the half copy, or the compiled copy
    generator = torch.Generator(device=DEVICE).manual_seed(7)
    shape = (batch, sampler.channels, sampler.image_size, sampler.image_size)
    z = torch.randn(shape, device=DEVICE, generator=generator) * 2

    def run():
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            image = decoder(leaf)
            (grad,) = torch.autograd.grad(image, leaf, grad_outputs=torch.ones_like(image))
        return grad

    with sampler._step.numerics(), nvtx_range(f"bench/decoder/B{batch}"):
        run()  # warm-up (a compiled decoder is compiled already: same shapes as the step)
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        synchronize()
    return (time.perf_counter() - start) / repeats


def time_steps(sampler: Sampler, batch: int, warmup: int, steps: int, label: str, profile: bool) -> dict:
    """Run `warmup` then `steps` reverse steps from x_T; time the latter block."""
    labels = (torch.arange(batch, device=DEVICE) % VE_CLASSES).long()
    seeds = list(range(1000, 1000 + batch))
    shape = (sampler.channels, sampler.image_size, sampler.image_size)
    x = sampler.noise_source(seeds, INITIAL_NOISE_STREAM, shape, DEVICE)
    step = sampler._step  # the loop of Sampler.sample: the batch bound once, then advance(x, i, bound)
    x, bound = step.begin_batch(x, labels, seeds, None)
    indices = list(reversed(range(sampler.schedule.num_steps)))
    if warmup + steps >= len(indices):
        raise SystemExit(f"--warmup + --steps must be < the schedule's {len(indices)} steps")
    synchronize()
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if GPU else 0
    start = time.perf_counter()
    with step.numerics():  # entered once per batch, as Sampler.sample does
        with nvtx_range(f"bench/{label}/warmup"):
            for i in indices[:warmup]:
                x = step.advance(x, i, bound)
        synchronize()
        warmup_s = time.perf_counter() - start
        if profile:
            torch.cuda.profiler.start()  # nsys --capture-range=cudaProfilerApi records from here
        start = time.perf_counter()
        with nvtx_range(f"bench/{label}/timed"):
            for i in indices[warmup:warmup + steps]:
                x = step.advance(x, i, bound)
            synchronize()
        seconds = time.perf_counter() - start
        if profile:
            torch.cuda.profiler.stop()
    peak = (torch.cuda.max_memory_allocated() - base) if GPU else None
    return {"step_s": seconds / steps, "warmup_s": warmup_s, "work_bytes": peak}


def fidelity(eager: Sampler, compiled: Sampler, batch: int, steps: int) -> dict:
    """Max per-step relative L2 errors (UNet output, x_{t-1}) of `compiled` vs `eager`, teacher-forced."""
    labels = (torch.arange(batch, device=DEVICE) % VE_CLASSES).long()
    seeds = list(range(2000, 2000 + batch))
    shape = (eager.channels, eager.image_size, eager.image_size)
    x = eager.noise_source(seeds, INITIAL_NOISE_STREAM, shape, DEVICE)
    worst_unet = worst_x = 0.0
    n = eager.schedule.num_steps
    for i in list(reversed(range(n)))[:: max(1, n // steps)][:steps]:
        with torch.no_grad(), fp32_reference_math(x.device):
            expected_out = eager.unet(x, eager.schedule.timestep_map[i].expand(batch), eager.prior_labels(labels))
        expected = eager.step(x, i, labels, None, None, seeds)
        actual = compiled.step(x, i, labels, None, None, seeds)
        out = compiled._step.last_model_output
        worst_unet = max(worst_unet, ((out - expected_out).norm() / expected_out.norm()).item())
        worst_x = max(worst_x, ((actual - expected).norm() / expected.norm()).item())
        x = expected
    return {"unet_rel": worst_unet, "x_rel": worst_x, "steps": steps}


# ---- the run --------------------------------------------------------------------------------------
def run_preset(preset: str, args, peak_tflops: float, half_dtype) -> tuple[list[dict], list[dict]]:
    rows, checks = [], []
    latent = preset in LATENT_PRESETS
    if latent:
        flops = latent_flops_per_image_step(preset)
        unet, decoder = build_latent(preset, DEVICE)
        image_size = unet.image_size * decoder.scale_factor
        schedule_config = ScheduleConfig(sampling_steps=str(LATENT_STEPS_PER_IMAGE))  # DiT's: linear, 1000 betas
        steps_per_image, modes = LATENT_STEPS_PER_IMAGE, args.guidance
    else:
        flops = flops_per_image_step(preset)
        unet, decoder = build_prior(preset, DEVICE), None
        image_size = unet.image_size
        schedule_config = ScheduleConfig(**ADM_DIFFUSION_FLAGS[PRESETS[preset][1]], sampling_steps=str(STEPS_PER_IMAGE))
        steps_per_image, modes = STEPS_PER_IMAGE, ("igds",)
    ve = build_ve(preset, image_size, DEVICE)
    schedule = DiffusionSchedule(schedule_config, device=DEVICE)
    class_map = list(range(0, 1000, 1000 // VE_CLASSES))[:VE_CLASSES] if unet.num_classes else None
    half_name = "eager-fp16" if half_dtype == torch.float16 else "eager-bf16"
    variants = [v for v in args.variants if GPU or v != "graphs"]
    options = dict(json.loads(args.compile_options)) if args.compile_options else {}
    # Timed baselines: plain PyTorch numerics; the fidelity reference: true fp32, deterministic.
    eager = (make_sampler(unet, schedule, ve, class_map, reference=False, decoder=decoder)
             if "eager-fp32" in variants else None)
    reference = make_sampler(unet, schedule, ve, class_map, decoder=decoder) if args.check_fidelity else None
    half = None
    if "eager-half" in variants:
        half_unet = HalfPrecisionPrior(unet, half_dtype) if latent else low_precision_copy(unet, half_dtype,
                                                                                          channels_last=False)
        half_decoder = None if decoder is None else low_precision_copy(decoder, half_dtype, channels_last=False)
        half = make_sampler(half_unet, schedule, HalfPrecisionVE(ve, half_dtype), class_map, reference=False,
                            decoder=half_decoder)
    compiled = None
    if "compiled" in variants or "graphs" in variants:
        compiled = make_sampler(unet, schedule, ve, class_map, "compiled", options, decoder=decoder)
    for batch in args.batch_sizes:
        measured = {}
        decoder_s = {}  # per sampler (the graphs rows share the compiled sampler's decoder)
        for variant in variants:
            sampler = {"eager-fp32": eager, "eager-half": half, "compiled": compiled, "graphs": compiled}[variant]
            if isinstance(sampler._step, CompiledStep):
                sampler._step.use_graphs = variant == "graphs"
            name = half_name if variant == "eager-half" else variant
            for mode in modes:
                label = f"{preset}/{name}/B{batch}" + (f"/{mode}" if latent else "")
                profile = GPU and args.profile == variant and batch == args.batch_sizes[-1] and mode == "igds"
                key = {"preset": preset, "variant": name, "batch": batch}
                if latent:
                    key["guidance"] = mode
                try:
                    with guidance_scale(sampler, 0.0) if mode == "none" else contextlib.nullcontext():
                        result = time_steps(sampler, batch, args.warmup, args.steps, label, profile)
                except Exception as error:  # noqa: BLE001 - one failing variant must not cost the others' rows
                    message = "out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else (
                        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200])
                    rows.append({**key, "error": message})
                    print(f"[bench] {label}: FAILED {message}", file=sys.stderr, flush=True)
                    traceback.print_exc()
                    if GPU:
                        torch.cuda.empty_cache()
                    continue
                if latent and mode == "igds" and id(sampler) not in decoder_s:
                    try:
                        decoder_s[id(sampler)] = time_decoder(sampler, batch, args.steps)
                    except Exception as error:  # noqa: BLE001 - the step's row stands without it
                        decoder_s[id(sampler)] = None
                        print(f"[bench] {label}: decoder timing FAILED {type(error).__name__}: {error}"[:300],
                              file=sys.stderr, flush=True)
                        if GPU:
                            torch.cuda.empty_cache()
                measured[(variant, mode)] = result["step_s"]
                step_flops = flops["unguided"] if mode == "none" else flops["total"]
                tflops = step_flops * batch / result["step_s"] / 1e12
                row = {
                    **key,
                    "ms_per_step": result["step_s"] * 1e3,
                    "images_per_s": batch / (result["step_s"] * steps_per_image),
                    "s_per_image": result["step_s"] * steps_per_image / batch,
                    "tflops": tflops, "peak_fraction": tflops / peak_tflops,
                    "work_gib": None if result["work_bytes"] is None else result["work_bytes"] / 2**30,
                    "warmup_s": result["warmup_s"],
                }
                extra = ""
                if latent:
                    row["steps_per_image"] = steps_per_image
                    if mode == "igds" and decoder_s[id(sampler)] is not None:
                        row["decoder_ms"] = decoder_s[id(sampler)] * 1e3
                        row["decoder_share"] = decoder_s[id(sampler)] / result["step_s"]
                        extra = (f", decoder fwd+bwd {row['decoder_ms']:.2f} ms "
                                 f"({100 * row['decoder_share']:.0f}% of the step)")
                # Progress as it is measured: a run cut short by a timeout still leaves its finished rows.
                print(f"[bench] {label}: {result['step_s'] * 1e3:.2f} ms/step, "
                      f"{row['s_per_image']:.3f} s/image @{steps_per_image}, {tflops:.2f} TFLOP/s, "
                      f"warm-up {result['warmup_s']:.1f} s{extra}", file=sys.stderr, flush=True)
                rows.append(row)
        for row in rows:
            if row["preset"] == preset and row["batch"] == batch and "ms_per_step" in row:
                step_s = row["ms_per_step"] / 1e3
                mode = row.get("guidance", "igds")
                for field, variant in (("vs_eager_fp32", "eager-fp32"), ("vs_eager_half", "eager-half"),
                                       ("vs_compiled", "compiled")):
                    baseline = measured.get((variant, mode))
                    row[field] = None if baseline is None else baseline / step_s
        if compiled is not None:
            if args.check_fidelity and batch == args.batch_sizes[0]:
                compiled._step.use_graphs = GPU and "graphs" in variants
                try:
                    checks.append({"preset": preset, "batch": batch, "graphs": compiled._step.use_graphs,
                                   **fidelity(reference, compiled, batch, args.fidelity_steps)})
                except Exception:  # noqa: BLE001 - report it, keep the timing rows
                    traceback.print_exc()
            compiled._step.release_graphs()
        if GPU:
            torch.cuda.empty_cache()
    for row in rows:
        row.update(unet_gflop=flops["unet"] / 1e9, encoder_gflop=flops["encoder"] / 1e9)
        if latent:
            row.update(decoder_gflop=flops["decoder"] / 1e9, unguided_gflop=flops["unguided"] / 1e9)
    if compiled is not None:
        config = compiled._step.config
        for row in rows:
            if row["variant"] in ("compiled", "graphs"):
                row["config"] = (f"{config.dtype}/{config.encoder_dtype}"
                                 + (f"/{config.decoder_dtype}" if latent else "")
                                 + f", {config.backend} {config.mode}, attention {compiled._step.attention}")
    return rows, checks


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's acceptance targets against what this run measured ('open' where it did not)."""
    def best(preset, variant, batch=None):
        found = [r for r in rows if r["preset"] == preset and r["variant"] == variant and "ms_per_step" in r
                 and (batch is None or r["batch"] == batch)]
        return min(found, key=lambda r: r["s_per_image"]) if found else None

    def status(ok):
        return "open (not measured here)" if ok is None else ("PASS" if ok else "FAIL")

    graphs256 = best("adm256", "graphs") if GPU else None
    lines = []
    value = None if graphs256 is None else graphs256["s_per_image"]
    shown = "-" if value is None else f"{value:.3f} (B={graphs256['batch']})"
    lines.append(f"| adm256 compiled+graphs s/image (250 steps) <= {TARGET_S_PER_IMAGE_ADM256} | {shown} | "
                 f"{status(None if value is None else value <= TARGET_S_PER_IMAGE_ADM256)} |")
    for key, limit, what in (("vs_eager_fp32", TARGET_SPEEDUP_VS_EAGER_FP32, "eager fp32"),
                             ("vs_eager_half", TARGET_SPEEDUP_VS_EAGER_HALF, "eager fp16")):
        ratio = None if graphs256 is None else graphs256.get(key)
        shown = "-" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"| adm256 compiled+graphs >= {limit}x {what} (same batch) | {shown} | "
                     f"{status(None if ratio is None else ratio >= limit)} |")
    graphs64 = best("adm64", "graphs", 64) if GPU else None
    ratio = None if graphs64 is None else graphs64.get("vs_compiled")
    lines.append(f"| adm64 B=64 graphs >= {TARGET_GRAPHS_VS_COMPILED_ADM64_B64}x compiled without graphs | "
                 f"{'-' if ratio is None else f'{ratio:.2f}x'} | "
                 f"{status(None if ratio is None else ratio >= TARGET_GRAPHS_VS_COMPILED_ADM64_B64)} |")
    return lines


def format_report(rows, checks, peak, peak_n, args, command) -> str:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    device = torch.cuda.get_device_name() if GPU else f"CPU ({os.cpu_count()} cores)"
    import triton

    lines = [
        f"## bench/sampler.py — {device}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"
        + (f", CUDA {torch.version.cuda}" if GPU else ""),
        f"- command: `{command}`",
        f"- measured bf16 matmul peak ({peak_n}^3): {peak:.1f} TFLOP/s",
    ]
    adm_rows = [r for r in rows if r["preset"] not in LATENT_PRESETS]
    latent_rows = [r for r in rows if r["preset"] in LATENT_PRESETS]
    if adm_rows or not latent_rows:
        lines.append(f"- timing: {args.warmup} warm-up steps (compile/autotune/capture), then {args.steps} guided steps "
                     f"timed; s/image scaled to {STEPS_PER_IMAGE} steps")
    else:
        lines.append(f"- timing: {args.warmup} warm-up steps (compile/autotune/capture), then {args.steps} steps timed, "
                     f"guided and unguided; s/image scaled to {LATENT_STEPS_PER_IMAGE} steps")
    if adm_rows or not latent_rows:
        lines += [
            "",
            "| preset | variant | batch | ms/step | images/s | s/image @250 | TFLOP/s | % peak | work GiB "
            "| x eager32 | x eager-half | x compiled | warm-up s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for r in adm_rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['error']} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['ms_per_step']:.2f} | {r['images_per_s']:.3f} "
            f"| {r['s_per_image']:.3f} | {r['tflops']:.2f} | {100 * r['peak_fraction']:.1f}% "
            f"| {num(r['work_gib'], '.2f')} "
            f"| {num(r.get('vs_eager_fp32'), '.2f')} | {num(r.get('vs_eager_half'), '.2f')} "
            f"| {num(r.get('vs_compiled'), '.2f')} | {r['warmup_s']:.1f} |"
        )
    if latent_rows:
        lines += [
            "",
            f"Latent prior (DiT under classifier-free guidance, scale {CFG_SCALE}, + VAE decoder); guidance "
            f"{' and '.join(args.guidance)} (igds = IGDS-guided steps, none = unguided); s/image scaled to "
            f"{LATENT_STEPS_PER_IMAGE} steps:",
            "",
            f"| preset | variant | guidance | batch | ms/step | images/s | s/image @{LATENT_STEPS_PER_IMAGE} | TFLOP/s "
            "| % peak | work GiB | decoder fwd+bwd ms | decoder share | x eager32 | x eager-half | x compiled "
            "| warm-up s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for r in latent_rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['variant']} | {r['guidance']} | {r['batch']} | {r['error']} |"
                         + " |" * 11)
            continue
        share = r.get("decoder_share")
        lines.append(
            f"| {r['preset']} | {r['variant']} | {r['guidance']} | {r['batch']} | {r['ms_per_step']:.2f} "
            f"| {r['images_per_s']:.3f} | {r['s_per_image']:.3f} | {r['tflops']:.2f} | {100 * r['peak_fraction']:.1f}% "
            f"| {num(r['work_gib'], '.2f')} | {num(r.get('decoder_ms'), '.2f')} "
            f"| {'-' if share is None else f'{100 * share:.0f}%'} "
            f"| {num(r.get('vs_eager_fp32'), '.2f')} | {num(r.get('vs_eager_half'), '.2f')} "
            f"| {num(r.get('vs_compiled'), '.2f')} | {r['warmup_s']:.1f} |"
        )
    flop_rows = {(r["preset"], r["unet_gflop"], r["encoder_gflop"]) for r in adm_rows}
    lines.append("")
    for preset, unet_gflop, encoder_gflop in sorted(flop_rows):
        lines.append(f"- {preset}: {unet_gflop:.1f} GFLOP UNet forward + {encoder_gflop:.1f} GFLOP encoder "
                     "forward/input-backward per image per step (flop_counter, meta device)")
    latent_flops = {(r["preset"], r["unet_gflop"], r["decoder_gflop"], r["encoder_gflop"], r["unguided_gflop"])
                    for r in latent_rows}
    def gflop(value):
        return f"{value:.1f}" if value >= 10 else f"{value:.3f}"

    for preset, unet_gflop, decoder_gflop, encoder_gflop, unguided_gflop in sorted(latent_flops):
        guided = unet_gflop + decoder_gflop + encoder_gflop
        lines.append(f"- {preset}: guided {gflop(guided)} GFLOP per image per step = {gflop(unet_gflop)} CFG DiT forward "
                     f"+ {gflop(decoder_gflop)} decoder forward/input-backward ({100 * decoder_gflop / guided:.0f}%) + "
                     f"{gflop(encoder_gflop)} encoder forward/input-backward; unguided {gflop(unguided_gflop)} "
                     "(bench/model_stats.py latent_step_stats, meta device)")
    configs = sorted({r["config"] for r in rows if "config" in r})
    for config in configs:
        lines.append(f"- compiled config: {config}")
    if checks:
        lines += ["", "Fidelity, compiled vs eager fp32, teacher-forced (max over steps):", "",
                  "| preset | batch | graphs | steps | UNet output rel L2 | x_{t-1} rel L2 |",
                  "|---|---:|---|---:|---:|---:|"]
        for c in checks:
            lines.append(f"| {c['preset']} | {c['batch']} | {c['graphs']} | {c['steps']} "
                         f"| {c['unet_rel']:.2e} | {c['x_rel']:.2e} |")
    lines += ["", "Targets:", "", "| target | measured | status |", "|---|---|---|", *target_lines(rows)]
    if not GPU:
        lines += ["", "CPU run: a smoke test of the script only (Triton kernels interpreted, no CUDA graphs); "
                  "absolute numbers and ratios mean nothing for the GPU targets."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny" if not GPU else "adm64,adm256",
                        help=f"comma-separated, of {sorted(PRESETS) + sorted(LATENT_PRESETS)}")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default per preset)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--guidance", default=",".join(GUIDANCE_MODES),
                        help=f"latent presets: comma-separated, of {GUIDANCE_MODES} (IGDS-guided / unguided rows)")
    parser.add_argument("--warmup", type=int, default=3 if GPU else 1)
    parser.add_argument("--steps", type=int, default=5 if GPU else 2)
    parser.add_argument("--compile-options", default=None,
                        help='CompileConfig fields as JSON, e.g. \'{"mode": "default", "backend": "aot_eager"}\'')
    parser.add_argument("--half-dtype", choices=("fp16", "bf16"), default="fp16" if GPU else "bf16")
    parser.add_argument("--check-fidelity", action="store_true", help="teacher-forced compiled vs eager errors")
    parser.add_argument("--fidelity-steps", type=int, default=4)
    parser.add_argument("--profile", choices=VARIANTS, default=None,
                        help="wrap this variant's timed steps (largest batch) in cudaProfilerStart/Stop for nsys")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    parser.add_argument("--append-results", action="store_true", help=f"append the report to {RESULTS}")
    args = parser.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in args.presets if p not in PRESETS and p not in LATENT_PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; known: {sorted(PRESETS) + sorted(LATENT_PRESETS)}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in args.variants):
        parser.error(f"variants must be among {VARIANTS}")
    args.guidance = [m.strip() for m in args.guidance.split(",") if m.strip()]
    if not args.guidance or any(m not in GUIDANCE_MODES for m in args.guidance):
        parser.error(f"--guidance must be among {GUIDANCE_MODES}")
    args.explicit_batches = args.batch_sizes
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/sampler.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    peak, peak_n = matmul_peak_tflops()
    half_dtype = torch.float16 if args.half_dtype == "fp16" else torch.bfloat16
    rows, checks = [], []
    for preset in args.presets:
        batches = args.explicit_batches or ",".join(map(str, DEFAULT_BATCHES[preset]))
        args.batch_sizes = [int(b) for b in batches.split(",")]
        found_rows, found_checks = run_preset(preset, args, peak, half_dtype)
        rows += found_rows
        checks += found_checks
    report = format_report(rows, checks, peak, peak_n, args, command)
    print(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "fidelity": checks, "peak_tflops": peak, "command": command}, handle, indent=1)
    if args.append_results:
        with open(RESULTS, "a") as handle:
            handle.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
