"""Time the whole guided reverse step: eager fp32, eager half, compiled, compiled + CUDA graphs.

    python bench/sampler.py --presets adm256 --batch-sizes 8,32 --check-fidelity --append-results
    python bench/sampler.py --presets tiny                      # CPU smoke run (no graphs on CPU)
    python bench/sampler.py --presets dit-xl2-256 --batch-sizes 16  # the latent prior (DiT + SD's VAE)
    python bench/sampler.py --presets dit-tiny                  # its CPU smoke run

One process, one run, per preset (random weights; zero-initialised ADM output layers re-drawn so
every layer computes): the ADM prior and a ResNet-50 VE (ResNet-18 for `tiny`) with a 10-class head,
guidance scale 1, beta 0.5, x0 mode (the paper's setting). Every row of a batch size samples the
same (class, seed) jobs: VE classes 0..9 in turn, seeds 1000, 1001, ... Variants, each at every
batch size:

    eager-fp32   backend="eager" timed with PyTorch's defaults (reference_numerics=False: cuDNN may use
                 TF32 convolutions and benchmark-chosen algorithms) and the eager backend's own noise
                 (torch generators per seed) — the faster, conservative baseline; --check-fidelity
                 compares against the true-fp32 deterministic reference (Philox noise, as compiled)
    eager-fp16   the same eager step on fp16 copies of the UNet and the encoder (guided-diffusion's
                 use_fp16; bf16 on CPU, where fp16 convolutions are not a fast path)
    compiled     backend="compiled" (CompileConfig defaults, overridable) with graphs switched off;
                 Philox noise drawn in the fused update kernel
    graphs       the same CompiledStep object replaying its CUDA graph (GPU only)

The peers, what a user would run instead, on the same weights, jobs and guidance settings, in the same
process (each row's "x <peer>" = the peer's s/image over the row's, > 1 = the row is faster):

    gd-fp32      ADM presets: guided-diffusion's own code (guided-diffusion-sdk, as a library): its
                 UNetModel holding our weights (key for key), use_fp16=False, its SpacedDiffusion
                 respaced to 250 steps, the loop of its p_sample_loop, the IGDS gradient supplied by
                 igds_fast.frontends.IGDSConditioner (patched condition_mean, mode x0: no extra UNet call)
    gd-fp16      the same with use_fp16=True and convert_to_fp16() (its fast mode) and a float16 encoder
                 for the gradient (its classifier_use_fp16)
    minimax-b1   DiT presets: DiT's diffusion (guided-diffusion's code; DiT's diffusion/ is a copy)
                 looping DiT's forward_with_cfg (DoubledBatchCFG: [z; z] with [y; null], CFG 4) at batch
                 1, fp32 with TF32 allowed, 50 steps — as MinimaxDiffusion's sample.py runs it — with the
                 same IGDS gradient (through the decoder) for the guided rows, none for the unguided
    minimax      the same at our batch size

The side-by-side table comes first: per preset, guidance and batch, ours compiled+graphs (compiled
where there are no graphs, on CPU; eager fp32 where nothing was compiled) against the fastest peer.
--same-math-rounds (default 8 on CPU, 0 on GPU): our eager fp32 step and gd-fp32's step interleaved,
one step each per round, each side's fastest step kept (load from other processes only adds time),
their ratio in the JSON's "same_math" (tests/test_bench_peers.py checks it on CPU).

Timing: `--warmup` steps first, each timed alone: the first includes torch.compile, autotuning or
graph capture, and its time above a steady step is the row's "compile/capture s" (a graphs row's is
capture alone when the compiled row ran before it at that guidance mode, else compile+capture);
their sum is "warm-up s". Then `--repeats` blocks of `--steps` steps, each timed between device
synchronisations, the fastest block kept; seconds per image at 250 steps = (block time / steps) *
250 / batch — scaled from the timed steps, not a measured 250-step run (every step of the paper's
setting has the same cost).
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
OUR_VARIANTS = ("eager-fp32", "eager-half", "compiled", "graphs")
# The peers (module docstring): name -> the presets they apply to ("adm": pixel ADM, "latent": DiT).
PEER_VARIANTS = {"gd-fp32": "adm", "gd-fp16": "adm", "minimax-b1": "latent", "minimax": "latent"}
VARIANTS = (*OUR_VARIANTS, *PEER_VARIANTS)
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


def make_sampler(unet, schedule, ve, class_map, backend="eager", options=None, reference=True, decoder=None,
                 noise="philox") -> Sampler:
    # A latent's x0 prediction is not clipped (DiT's sample.py: clip_denoised=False).
    guidance = GuidanceConfig(scale=1.0, beta=0.5, clip_x0=decoder is None)
    return Sampler(unet, schedule, ve, guidance, backend=backend, prior_class_map=class_map, noise=noise,
                   backend_options=options, reference_numerics=reference,  # (the compiled step ignores it)
                   decoder=decoder)


@contextlib.contextmanager
def guidance_scale(sampler: Sampler, scale: float):
    """The sampler's steps with another guidance scale (0 = unguided), for the block only.

    Every step reads StepContext.guidance_config at call time (guided(i), the update's scale), so one sampler
    (one compile) times both; the compiled step captures one graph per (guided or not, noise kind)."""
    context = sampler.context
    saved = context.guidance_config
    context.guidance_config = dataclasses.replace(saved, scale=scale)
    try:
        yield
    finally:
        context.guidance_config = saved


def time_decoder(sampler: Sampler, batch: int, repeats: int) -> float:
    """Seconds of one forward + input-gradient backward of the sampler's guidance decoder at `batch`."""
    decoder = sampler.stepper.ops.guidance.decoder  # fp32, the half copy, or the compiled copy
    generator = torch.Generator(device=DEVICE).manual_seed(7)
    shape = (batch, sampler.channels, sampler.image_size, sampler.image_size)
    z = torch.randn(shape, device=DEVICE, generator=generator) * 2

    def run():
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            image = decoder(leaf)
            (grad,) = torch.autograd.grad(image, leaf, grad_outputs=torch.ones_like(image))
        return grad

    with sampler.numerics(), nvtx_range(f"bench/decoder/B{batch}"):
        run()  # warm-up (a compiled decoder is compiled already: same shapes as the step)
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        synchronize()
    return (time.perf_counter() - start) / repeats


def timed_loop(advance, num_steps: int, warmup: int, steps: int, repeats: int, label: str, profile: bool) -> dict:
    """Time a loop of reverse steps; `advance()` runs the next one (x_{i-1} from x_i).

    `warmup` steps first, each timed on its own (the first carries torch.compile, autotuning or graph
    capture: its time above one steady step is the row's "1st-step overhead"), then `repeats` blocks of
    `steps` steps, each timed between device synchronisations; step_s = the fastest block's mean (a
    block slowed by another process on the machine does not count). Memory: peak allocated above the
    allocation at the start (weights excluded)."""
    if warmup + steps * repeats >= num_steps:
        raise SystemExit(f"--warmup + --steps x --repeats must be < the schedule's {num_steps} steps")
    synchronize()
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if GPU else 0
    warmup_times, blocks = [], []
    with nvtx_range(f"bench/{label}/warmup"):
        for _ in range(warmup):
            start = time.perf_counter()
            advance()
            synchronize()
            warmup_times.append(time.perf_counter() - start)
    for block in range(repeats):
        if profile and block == 0:
            torch.cuda.profiler.start()  # nsys --capture-range=cudaProfilerApi records from here
        start = time.perf_counter()
        with nvtx_range(f"bench/{label}/timed"):
            for _ in range(steps):
                advance()
            synchronize()
        blocks.append((time.perf_counter() - start) / steps)
        if profile and block == 0:
            torch.cuda.profiler.stop()
    peak = (torch.cuda.max_memory_allocated() - base) if GPU else None
    step_s = min(blocks)
    first = warmup_times[0] if warmup_times else None
    return {"step_s": step_s, "warmup_s": sum(warmup_times), "first_step_s": first,
            "overhead_s": None if first is None else max(0.0, first - step_s), "block_step_s": blocks,
            "work_bytes": peak}


def batch_jobs(batch: int) -> tuple[torch.Tensor, list[int]]:
    """The (VE class, seed) jobs every row of a batch size samples: classes 0..9 in turn, seeds 1000+."""
    return (torch.arange(batch, device=DEVICE) % VE_CLASSES).long(), list(range(1000, 1000 + batch))


@contextlib.contextmanager
def our_loop(sampler: Sampler, batch: int):
    """advance() running our sampler's next reverse step on the batch's jobs from x_T: Sampler.sample's
    own loop (`Sampler.batch`: x_T, numerics and the bound batch once, then one reverse step per call)."""
    labels, seeds = batch_jobs(batch)
    with sampler.batch(labels, seeds) as run:
        yield run.step


def time_steps(sampler: Sampler, batch: int, warmup: int, steps: int, label: str, profile: bool,
               repeats: int = 1) -> dict:
    """Run `warmup` then `repeats` x `steps` reverse steps of our sampler from x_T (timed_loop)."""
    with our_loop(sampler, batch) as advance:
        return timed_loop(advance, sampler.schedule.num_steps, warmup, steps, repeats, label, profile)


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
        out = compiled.stepper.last_model_output
        worst_unet = max(worst_unet, ((out - expected_out).norm() / expected_out.norm()).item())
        worst_x = max(worst_x, ((actual - expected).norm() / expected.norm()).item())
        x = expected
    return {"unet_rel": worst_unet, "x_rel": worst_x, "steps": steps}


# ---- the peers ------------------------------------------------------------------------------------
class DoubledBatchCFG(nn.Module):
    """DiT's `forward_with_cfg` (its models.py) around our DiT: the loop's doubled batch in and out.

    x [2B, C, H, W] = [z; z] (only x[:B] is read), t [2B], y [2B] = [labels; null], cfg_scale s ->
    [2B, 2C, H, W]: the DiT runs [x[:B]; x[:B]] with y; the first `guided_channels` eps channels are
    uncond + s (cond - uncond) for both halves, the rest are the DiT's own rows (DiT's `eps, rest =
    out[:, :3], out[:, 3:]`). MinimaxDiffusion's sample.py drives it through guided-diffusion's
    p_sample_loop at B = 1. Written here from that description (DiT's models.py needs timm).
    """

    def __init__(self, dit: nn.Module, guided_channels: int = 3):
        super().__init__()
        self.dit, self.guided_channels, self.null_class = dit, guided_channels, dit.null_class

    def forward(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = self.dit(torch.cat([half, half]), t, y)
        g, rows = self.guided_channels, len(half)
        conditional, unconditional = out[:rows, :g], out[rows:, :g]
        eps = unconditional + cfg_scale * (conditional - unconditional)
        return torch.cat([torch.cat([eps, eps]), out[:, g:]], dim=1)


@contextlib.contextmanager
def tf32_allowed():
    """MinimaxDiffusion's sample.py sets allow_tf32 for matmuls and cuDNN: its rows run so, then restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Peer:
    """A peer sampler: guided-diffusion's own SpacedDiffusion loop with the IGDS gradient of
    `igds_fast.frontends.IGDSConditioner` (patched condition_mean, mode x0: the gradient at the loop's
    own pred_xstart, no extra UNet call), on the same weights and (class, seed) jobs as our rows.

    model: what the loop calls (guided-diffusion's UNetModel, or DoubledBatchCFG); cfg_scale: None for
    a pixel ADM, else the doubled CFG batch of DiT / MinimaxDiffusion; fixed_batch: 1 for minimax-b1.
    """

    def __init__(self, name, model, diffusion, conditioner, prior_labels, shape, clip_denoised, cfg_scale=None,
                 fixed_batch=None, numerics=contextlib.nullcontext):
        self.name, self.model, self.diffusion, self.conditioner = name, model, diffusion, conditioner
        self.prior_labels, self.shape, self.clip_denoised = prior_labels, shape, clip_denoised
        self.cfg_scale, self.fixed_batch, self.numerics = cfg_scale, fixed_batch, numerics

    @contextlib.contextmanager
    def loop(self, batch: int, guided: bool = True):
        """advance() running the next iteration of the diffusion's own p_sample_loop_progressive
        (p_sample_loop is that generator run to its end): one p_sample, the IGDS shift inside."""
        labels, seeds = batch_jobs(batch)
        x = PEER_NOISE(seeds, INITIAL_NOISE_STREAM, self.shape, DEVICE)
        y = self.prior_labels(labels)
        kwargs = {} if y is None else {"y": y}
        if self.cfg_scale is not None:  # sample.py: z = cat([z, z]), y = cat([y, null])
            x = torch.cat([x, x])
            kwargs = {"y": torch.cat([y, torch.full_like(y, self.model.null_class)]), "cfg_scale": self.cfg_scale}
        # cond_fn only switches the shift on: the patched condition_mean computes IGDS from p_mean_var.
        steps = self.diffusion.p_sample_loop_progressive(
            self.model, tuple(x.shape), noise=x, clip_denoised=self.clip_denoised,
            cond_fn=self.conditioner.cond_fn if guided else None, model_kwargs=kwargs, device=DEVICE)
        try:
            with self.numerics():
                yield lambda: next(steps)
        finally:
            steps.close()

    def time(self, batch: int, warmup: int, steps: int, repeats: int, label: str, guided: bool = True) -> dict:
        """timed_loop over the peer's own loop (`loop`)."""
        with self.loop(batch, guided) as advance:
            return timed_loop(advance, self.diffusion.num_timesteps, warmup, steps, repeats, label, False)


def same_math_check(eager: Sampler, peer: Peer, batch: int, rounds: int) -> dict:
    """Our eager fp32 step against guided-diffusion's fp32 step (gd-fp32) on the same work, interleaved:
    one warm-up step each, then `rounds` rounds of one step of each (order alternating), every step
    timed alone between synchronisations; each side's fastest step counts, so load from other processes
    (which only ever adds time) cancels out of the ratio. ratio = ours / theirs (> 1 = ours slower)."""
    ours_s, theirs_s = [], []
    with our_loop(eager, batch) as ours, peer.loop(batch) as theirs:
        ours()
        theirs()
        synchronize()
        for k in range(rounds):
            for advance, times in ((ours, ours_s), (theirs, theirs_s))[:: 1 if k % 2 == 0 else -1]:
                start = time.perf_counter()
                advance()
                synchronize()
                times.append(time.perf_counter() - start)
    return {"batch": batch, "rounds": rounds, "ours_ms": min(ours_s) * 1e3, "gd_fp32_ms": min(theirs_s) * 1e3,
            "ratio": min(ours_s) / min(theirs_s)}


def _peer_noise():
    from igds_fast.sampling.backends import resolve_noise_source

    return resolve_noise_source("torch")[0]


PEER_NOISE = _peer_noise()  # x_T of the peers' jobs: our eager rows' torch noise, the same seeds


def guided_diffusion_modules():
    """guided-diffusion's own script_util (guided-diffusion-sdk, the original openai code)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its torch.cuda.amp decorators
            from guided_diffusion import script_util
    except ImportError as error:
        raise RuntimeError("guided-diffusion-sdk is not importable (pip install --no-deps "
                           "guided-diffusion-sdk==1.0.0, or carry bench/wheels/)") from error
    return script_util


def build_gd_peer(preset: str, unet: ADMUNet, reference: Sampler, class_map, use_fp16: bool) -> Peer:
    """gd-fp32 / gd-fp16: guided-diffusion's UNetModel (our weights, key for key) with use_fp16 and, for
    fp16, its convert_to_fp16() torso and a float16 encoder (its classifier_use_fp16), in its own
    SpacedDiffusion respaced to 250 steps; the IGDS gradient through IGDSConditioner."""
    from igds_fast.frontends import IGDSConditioner, label_map_from_class_map
    from igds_fast.guidance import IGDSGuidance

    script_util = guided_diffusion_modules()
    flags = {k: v for k, v in PRESETS[preset][0].items() if k != "use_fp16"}
    if not isinstance(flags.get("channel_mult", ""), str):
        flags["channel_mult"] = ",".join(str(m) for m in flags["channel_mult"])
    with torch.device(DEVICE):
        model = script_util.create_model(**{**flags, "dropout": 0.0}, use_checkpoint=False, use_fp16=use_fp16)
    model.load_state_dict(unet.state_dict(), strict=True)
    if use_fp16:
        model.convert_to_fp16()
    model = model.eval().requires_grad_(False)
    schedule = ADM_DIFFUSION_FLAGS[PRESETS[preset][1]]
    diffusion = script_util.create_gaussian_diffusion(
        steps=schedule["diffusion_steps"], learn_sigma=unet.learn_sigma, noise_schedule=schedule["noise_schedule"],
        timestep_respacing=str(STEPS_PER_IMAGE))
    guidance = reference.guidance_fn
    if use_fp16:
        guidance = IGDSGuidance.from_config(HalfPrecisionVE(reference.ve, torch.float16), reference.guidance)
    label_map = None if class_map is None else label_map_from_class_map(class_map, unet.num_classes)
    conditioner = IGDSConditioner(guidance, reference.guidance.scale, label_map, mode="x0", clip_denoised=True)
    conditioner.patch(diffusion, model)
    name = "gd-fp16" if use_fp16 else "gd-fp32"
    return Peer(name, model, diffusion, conditioner, reference.prior_labels,
                (reference.channels, reference.image_size, reference.image_size), clip_denoised=True)


def build_minimax_peer(prior: ClassifierFreeGuidance, reference: Sampler, class_map, batch_one: bool) -> Peer:
    """minimax-b1 / minimax: DiT's diffusion (guided-diffusion's code: create_diffusion("50") =
    linear, 1000 steps, learned sigma, respaced) looping DoubledBatchCFG of the same DiT, fp32 with TF32
    allowed as MinimaxDiffusion's sample.py; at B = 1 as it samples, or at our batch size."""
    from igds_fast.frontends import IGDSConditioner, label_map_from_class_map

    script_util = guided_diffusion_modules()
    model = DoubledBatchCFG(prior.prior, prior.guided_channels).eval()
    diffusion = script_util.create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear",
                                                      timestep_respacing=str(LATENT_STEPS_PER_IMAGE))
    label_map = None if class_map is None else label_map_from_class_map(class_map, prior.num_classes)
    conditioner = IGDSConditioner(reference.guidance_fn, reference.guidance.scale, label_map, mode="x0",
                                  clip_denoised=False)
    conditioner.patch(diffusion, model)
    return Peer("minimax-b1" if batch_one else "minimax", model, diffusion, conditioner, reference.prior_labels,
                (reference.channels, reference.image_size, reference.image_size), clip_denoised=False,
                cfg_scale=prior.scale, fixed_batch=1 if batch_one else None, numerics=tf32_allowed)


# ---- the run --------------------------------------------------------------------------------------
def applicable_variants(preset: str, variants) -> list[str]:
    """The variants of `variants` that run on `preset` here: graphs on CUDA only, each peer on its kind."""
    kind = "latent" if preset in LATENT_PRESETS else "adm"
    return [v for v in variants if (GPU or v != "graphs") and PEER_VARIANTS.get(v, kind) == kind]


def failure_message(error: Exception) -> str:
    return "out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else (
        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200])


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
    variants = applicable_variants(preset, args.variants)
    options = dict(json.loads(args.compile_options)) if args.compile_options else {}
    # Timed baselines: plain PyTorch numerics and the eager backend's own noise ("torch" generators, as
    # guided-diffusion's randn; the Philox stream of the compiled rows is a Triton kernel, interpreted
    # on CPU); the fidelity reference: true fp32, deterministic, Philox (the compiled rows' noise).
    # The peers take the IGDS guidance (VE, head, decoder) and the class map from `eager`.
    eager = make_sampler(unet, schedule, ve, class_map, reference=False, decoder=decoder, noise="torch")
    reference = make_sampler(unet, schedule, ve, class_map, decoder=decoder) if args.check_fidelity else None
    half = None
    if "eager-half" in variants:
        half_unet = HalfPrecisionPrior(unet, half_dtype) if latent else low_precision_copy(unet, half_dtype,
                                                                                          channels_last=False)
        half_decoder = None if decoder is None else low_precision_copy(decoder, half_dtype, channels_last=False)
        half = make_sampler(half_unet, schedule, HalfPrecisionVE(ve, half_dtype), class_map, reference=False,
                            decoder=half_decoder, noise="torch")
    compiled = None
    if "compiled" in variants or "graphs" in variants:
        compiled = make_sampler(unet, schedule, ve, class_map, "compiled", options, decoder=decoder)
    peers: dict[str, Peer | Exception] = {}

    def peer_of(variant: str) -> Peer:
        if variant not in peers:
            try:
                if latent:
                    peers[variant] = build_minimax_peer(unet, eager, class_map, batch_one=variant == "minimax-b1")
                else:
                    peers[variant] = build_gd_peer(preset, unet, eager, class_map, use_fp16=variant == "gd-fp16")
            except Exception as error:  # noqa: BLE001 - a peer that cannot be built is an error row
                traceback.print_exc()
                peers[variant] = error
        if isinstance(peers[variant], Exception):
            raise peers[variant]
        return peers[variant]

    compiled_modes = set()  # modes the compiled variant has run (then a graphs row's overhead is capture)
    for batch in args.batch_sizes:
        decoder_s = {}  # per sampler (the graphs rows share the compiled sampler's decoder)
        for variant in variants:
            peer = variant in PEER_VARIANTS
            sampler = None if peer else {"eager-fp32": eager, "eager-half": half, "compiled": compiled,
                                         "graphs": compiled}[variant]
            if sampler is not None and isinstance(sampler.stepper, CompiledStep):
                sampler.stepper.use_graphs = variant == "graphs"
            name = half_name if variant == "eager-half" else variant
            run_batch = 1 if variant == "minimax-b1" else batch
            if variant == "minimax-b1" and batch != args.batch_sizes[0]:
                continue  # batch 1 whatever our batch: measured once, compared with every batch
            for mode in modes:
                label = f"{preset}/{name}/B{run_batch}" + (f"/{mode}" if latent else "")
                profile = GPU and args.profile == variant and batch == args.batch_sizes[-1] and mode == "igds"
                key = {"preset": preset, "variant": name, "batch": run_batch}
                if latent:
                    key["guidance"] = mode
                try:
                    if peer:
                        result = peer_of(variant).time(run_batch, args.warmup, args.steps, args.repeats, label,
                                                       guided=mode == "igds")
                    else:
                        with guidance_scale(sampler, 0.0) if mode == "none" else contextlib.nullcontext():
                            result = time_steps(sampler, batch, args.warmup, args.steps, label, profile, args.repeats)
                except Exception as error:  # noqa: BLE001 - one failing variant must not cost the others' rows
                    message = failure_message(error)
                    rows.append({**key, "error": message})
                    print(f"[bench] {label}: FAILED {message}", file=sys.stderr, flush=True)
                    traceback.print_exc()
                    if GPU:
                        torch.cuda.empty_cache()
                    continue
                if latent and mode == "igds" and sampler is not None and id(sampler) not in decoder_s:
                    try:
                        decoder_s[id(sampler)] = time_decoder(sampler, batch, args.steps)
                    except Exception as error:  # noqa: BLE001 - the step's row stands without it
                        decoder_s[id(sampler)] = None
                        print(f"[bench] {label}: decoder timing FAILED {type(error).__name__}: {error}"[:300],
                              file=sys.stderr, flush=True)
                        if GPU:
                            torch.cuda.empty_cache()
                step_flops = flops["unguided"] if mode == "none" else flops["total"]
                tflops = step_flops * run_batch / result["step_s"] / 1e12
                overhead_kind = {"compiled": "compile",
                                 "graphs": "capture" if mode in compiled_modes else "compile+capture"}.get(variant)
                if variant == "compiled":
                    compiled_modes.add(mode)
                row = {
                    **key,
                    "ms_per_step": result["step_s"] * 1e3,
                    "images_per_s": run_batch / (result["step_s"] * steps_per_image),
                    "s_per_image": result["step_s"] * steps_per_image / run_batch,
                    "tflops": tflops, "peak_fraction": tflops / peak_tflops,
                    "work_gib": None if result["work_bytes"] is None else result["work_bytes"] / 2**30,
                    "warmup_s": result["warmup_s"], "first_step_s": result["first_step_s"],
                    "overhead_s": result["overhead_s"], "overhead_kind": overhead_kind,
                    "block_ms_per_step": [b * 1e3 for b in result["block_step_s"]],
                    "peer": peer, "steps_per_image": steps_per_image,
                }
                extra = ""
                if latent and mode == "igds" and sampler is not None and decoder_s[id(sampler)] is not None:
                    row["decoder_ms"] = decoder_s[id(sampler)] * 1e3
                    row["decoder_share"] = decoder_s[id(sampler)] / result["step_s"]
                    extra = (f", decoder fwd+bwd {row['decoder_ms']:.2f} ms "
                             f"({100 * row['decoder_share']:.0f}% of the step)")
                if overhead_kind is not None and result["overhead_s"] is not None:
                    extra += f", {overhead_kind} {result['overhead_s']:.1f} s (1st step above a steady one)"
                # Progress as it is measured: a run cut short by a timeout still leaves its finished rows.
                print(f"[bench] {label}: {result['step_s'] * 1e3:.2f} ms/step, "
                      f"{row['s_per_image']:.3f} s/image @{steps_per_image}, {tflops:.2f} TFLOP/s, "
                      f"warm-up {result['warmup_s']:.1f} s{extra}", file=sys.stderr, flush=True)
                rows.append(row)
        if (batch == args.batch_sizes[0] and args.same_math_rounds and "eager-fp32" in variants
                and "gd-fp32" in variants and not isinstance(peers.get("gd-fp32"), Exception)):
            try:
                checks.append({"preset": preset, "kind": "same-math",
                               **same_math_check(eager, peer_of("gd-fp32"), batch, args.same_math_rounds)})
            except Exception:  # noqa: BLE001 - report it, keep the timing rows
                traceback.print_exc()
        if compiled is not None:
            if args.check_fidelity and batch == args.batch_sizes[0]:
                compiled.stepper.use_graphs = GPU and "graphs" in variants
                try:
                    checks.append({"preset": preset, "kind": "fidelity", "batch": batch,
                                   "graphs": compiled.stepper.use_graphs,
                                   **fidelity(reference, compiled, batch, args.fidelity_steps)})
                except Exception:  # noqa: BLE001 - report it, keep the timing rows
                    traceback.print_exc()
            compiled.stepper.release_graphs()
        if GPU:
            torch.cuda.empty_cache()
    add_ratios(rows)
    for row in rows:
        row.update(unet_gflop=flops["unet"] / 1e9, encoder_gflop=flops["encoder"] / 1e9)
        if latent:
            row.update(decoder_gflop=flops["decoder"] / 1e9, unguided_gflop=flops["unguided"] / 1e9)
    if compiled is not None:
        config = compiled.stepper.compile_config
        for row in rows:
            if row["variant"] in ("compiled", "graphs"):
                row["config"] = (f"{config.dtype}/{config.encoder_dtype}"
                                 + (f"/{config.decoder_dtype}" if latent else "")
                                 + f", {config.backend} {config.mode}, attention {compiled.stepper.attention}")
    return rows, checks


def comparable(rows: list[dict], row: dict, variant: str) -> dict | None:
    """The measured row of `variant` that `row` is compared with: same preset, guidance and batch —
    minimax-b1 (batch 1 whatever ours) at any batch."""
    for other in rows:
        if (other["variant"] == variant and other["preset"] == row["preset"] and "ms_per_step" in other
                and other.get("guidance", "igds") == row.get("guidance", "igds")
                and (other["batch"] == row["batch"] or variant == "minimax-b1")):
            return other
    return None


def add_ratios(rows: list[dict]) -> None:
    """x eager32 / x eager-half / x compiled (same batch: step-time ratios) and x <peer> (s/image
    ratios: the peer's s/image over the row's, > 1 = the row is faster) on every measured row."""
    for row in rows:
        if "ms_per_step" not in row:
            continue
        for field, variant in (("vs_eager_fp32", "eager-fp32"), ("vs_eager_half", "eager-fp16"),
                               ("vs_eager_half", "eager-bf16"), ("vs_compiled", "compiled")):
            baseline = comparable(rows, row, variant)
            if baseline is not None or field not in row:
                row[field] = None if baseline is None else baseline["ms_per_step"] / row["ms_per_step"]
        for variant in PEER_VARIANTS:
            baseline = comparable(rows, row, variant)
            row[f"vs_{variant}"] = None if baseline is None else baseline["s_per_image"] / row["s_per_image"]


def best_peer(rows: list[dict], row: dict) -> dict | None:
    """The fastest peer row (s/image) comparable with `row`."""
    found = [r for r in (comparable(rows, row, v) for v in PEER_VARIANTS) if r is not None]
    return min(found, key=lambda r: r["s_per_image"]) if found else None


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
    half = next((r["variant"] for r in rows if r["preset"] == "adm256" and r["variant"].startswith("eager-")
                 and r["variant"] != "eager-fp32"), "eager-fp16")
    for key, limit, what in (("vs_eager_fp32", TARGET_SPEEDUP_VS_EAGER_FP32, "eager fp32"),
                             ("vs_eager_half", TARGET_SPEEDUP_VS_EAGER_HALF, f"eager fp16 (measured: {half})"),
                             ("vs_gd-fp16", TARGET_SPEEDUP_VS_EAGER_HALF,
                              "guided-diffusion's own fp16 sampler (gd-fp16)")):
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


def overhead(row: dict) -> str:
    """The compile / capture seconds of a compiled row (its 1st warm-up step above a steady step)."""
    if row.get("overhead_kind") is None or row.get("overhead_s") is None:
        return "-"
    return f"{row['overhead_s']:.1f} ({row['overhead_kind']})"


# Our row a peer table line shows, in order of preference (a run without graphs or compile falls back).
OUR_NAMES = {"graphs": "compiled+graphs", "compiled": "compiled (no graphs)", "eager-fp32": "eager fp32 (not compiled)"}


def peer_table(rows: list[dict]) -> list[str]:
    """The side-by-side table: ours compiled+graphs (compiled where there are no graphs, on CPU) against
    the fastest peer on the same work, then our eager fp32 step against guided-diffusion's fp32 step."""
    lines = [("Ours vs the peers (same process, weights, (class, seed) jobs and guidance; s/image at the "
              "preset's steps; x = the peer's s/image / ours, > 1 = ours faster):"), "",
             ("| preset | guidance | batch | ours | ours s/image | best peer | peer s/image | x best peer "
              "| our eager fp32 step / gd-fp32 step |"),
             "|---|---|---:|---|---:|---|---:|---:|---:|"]
    groups = []
    for row in rows:
        group = (row["preset"], row.get("guidance", "igds"), row["batch"])
        if not row.get("peer") and group not in groups:
            groups.append(group)
    for preset, mode, batch in groups:
        ours = [r for r in rows if (r["preset"], r.get("guidance", "igds"), r["batch"]) == (preset, mode, batch)
                and "ms_per_step" in r and r["variant"] in OUR_NAMES]
        if not ours:
            continue
        mine = min(ours, key=lambda r: list(OUR_NAMES).index(r["variant"]))  # graphs, else compiled, else eager
        name = OUR_NAMES[mine["variant"]]
        peer = best_peer(rows, mine)
        eager = comparable(rows, mine, "eager-fp32")
        same_math = "-" if eager is None or eager.get("vs_gd-fp32") is None else f"{1 / eager['vs_gd-fp32']:.2f}"
        lines.append(
            f"| {preset} | {mode} | {batch} | {name} | {mine['s_per_image']:.3f} "
            f"| {'-' if peer is None else peer['variant'] + ' (B=' + str(peer['batch']) + ')'} "
            f"| {'-' if peer is None else format(peer['s_per_image'], '.3f')} "
            f"| {'-' if peer is None else format(peer['s_per_image'] / mine['s_per_image'], '.2f')} | {same_math} |")
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
    if args.repeats > 1:
        lines.append(f"- {args.repeats} timed blocks per row, the fastest counts")
    lines += ["", *peer_table(rows)]
    if adm_rows or not latent_rows:
        lines += [
            "",
            "| preset | variant | batch | ms/step | images/s | s/image @250 | TFLOP/s | % peak | work GiB "
            "| x eager32 | x eager-half | x compiled | x gd-fp32 | x gd-fp16 | compile/capture s | warm-up s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for r in adm_rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['error']} |" + " |" * 12)
            continue
        lines.append(
            f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['ms_per_step']:.2f} | {r['images_per_s']:.3f} "
            f"| {r['s_per_image']:.3f} | {r['tflops']:.2f} | {100 * r['peak_fraction']:.1f}% "
            f"| {num(r['work_gib'], '.2f')} "
            f"| {num(r.get('vs_eager_fp32'), '.2f')} | {num(r.get('vs_eager_half'), '.2f')} "
            f"| {num(r.get('vs_compiled'), '.2f')} | {num(r.get('vs_gd-fp32'), '.2f')} "
            f"| {num(r.get('vs_gd-fp16'), '.2f')} | {overhead(r)} | {r['warmup_s']:.1f} |"
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
            "| x minimax-b1 | x minimax | compile/capture s | warm-up s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for r in latent_rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['variant']} | {r['guidance']} | {r['batch']} | {r['error']} |"
                         + " |" * 14)
            continue
        share = r.get("decoder_share")
        lines.append(
            f"| {r['preset']} | {r['variant']} | {r['guidance']} | {r['batch']} | {r['ms_per_step']:.2f} "
            f"| {r['images_per_s']:.3f} | {r['s_per_image']:.3f} | {r['tflops']:.2f} | {100 * r['peak_fraction']:.1f}% "
            f"| {num(r['work_gib'], '.2f')} | {num(r.get('decoder_ms'), '.2f')} "
            f"| {'-' if share is None else f'{100 * share:.0f}%'} "
            f"| {num(r.get('vs_eager_fp32'), '.2f')} | {num(r.get('vs_eager_half'), '.2f')} "
            f"| {num(r.get('vs_compiled'), '.2f')} | {num(r.get('vs_minimax-b1'), '.2f')} "
            f"| {num(r.get('vs_minimax'), '.2f')} | {overhead(r)} | {r['warmup_s']:.1f} |"
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
    same_math = [c for c in checks if c["kind"] == "same-math"]
    if same_math:
        lines += ["", ("Same math, our eager fp32 step vs guided-diffusion's fp32 step (gd-fp32), interleaved "
                       "step by step, each side's fastest step:"), "",
                  "| preset | batch | rounds | ours ms | gd-fp32 ms | ours / gd-fp32 |", "|---|---:|---:|---:|---:|---:|"]
        for c in same_math:
            lines.append(f"| {c['preset']} | {c['batch']} | {c['rounds']} | {c['ours_ms']:.2f} | {c['gd_fp32_ms']:.2f} "
                         f"| {c['ratio']:.2f} |")
    fidelity_checks = [c for c in checks if c["kind"] == "fidelity"]
    if fidelity_checks:
        lines += ["", "Fidelity, compiled vs eager fp32, teacher-forced (max over steps):", "",
                  "| preset | batch | graphs | steps | UNet output rel L2 | x_{t-1} rel L2 |",
                  "|---|---:|---|---:|---:|---:|"]
        for c in fidelity_checks:
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
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed blocks of --steps steps per row; the fastest block counts")
    parser.add_argument("--same-math-rounds", type=int, default=0 if GPU else 8,
                        help="ADM presets with eager-fp32 and gd-fp32: rounds of the interleaved step-by-step "
                             "comparison of the two (0 = off)")
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
    explicit_variants = args.variants != parser.get_default("variants")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        parser.error(f"variants must be among {VARIANTS}")
    if explicit_variants:  # a variant asked for by name must run on some preset of the run
        unused = [v for v in args.variants if not any(v in applicable_variants(p, [v]) for p in args.presets)]
        if unused:
            parser.error(f"variants {unused} apply to none of the presets {args.presets} (graphs: CUDA only; "
                         f"gd-*: the ADM presets; minimax*: the DiT presets)")
    if args.warmup < 0 or args.steps < 1 or args.repeats < 1 or not 0 <= args.same_math_rounds <= 200:
        parser.error("--warmup must be >= 0, --steps and --repeats >= 1, --same-math-rounds in [0, 200]")
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
            json.dump({"rows": rows, "fidelity": [c for c in checks if c["kind"] == "fidelity"],
                       "same_math": [c for c in checks if c["kind"] == "same-math"], "peak_tflops": peak,
                       "command": command}, handle, indent=1)
    if args.append_results:
        with open(RESULTS, "a") as handle:
            handle.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
