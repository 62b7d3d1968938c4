"""The bench's models: random-weight presets (ADM, DiT + VAE, ResNet VEs), their FLOP counts, our samplers.

Random weights, with the layers ADM zero-initialises re-drawn so every layer computes; the VE has
VE_CLASSES classes and a random head. Imported by bench/sampler.py, bench/self_check.py,
profiling/torch_trace.py and the tests (bench/__init__.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from bench import model_stats
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.guidance import GuidanceConfig
from igds_fast.models.adm import ADM_DIFFUSION_FLAGS, ADM_PRESETS, ADMUNet
from igds_fast.models.cfg import ClassifierFreeGuidance
from igds_fast.models.dit import DIT_PRESETS, DiT
from igds_fast.models.resnet import build_resnet
from igds_fast.models.vae import SD_VAE_SCALING_FACTOR, LatentDecoder
from igds_fast.preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess
from igds_fast.sampling import Sampler
from igds_fast.sampling.compiled import low_precision_copy
from igds_fast.ve import VariationalEstimator

STEPS_PER_IMAGE = 250  # the ADM presets' respaced steps (the paper's setting)
LATENT_STEPS_PER_IMAGE = 50  # the DiT presets' (DiT's and MinimaxDiffusion's sample.py)
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
    "dit-xl2-256": (DIT_PRESETS["dit-xl2-256"], model_stats.sd_vae_config(256), "resnet50"),
}
CFG_SCALE = model_stats.CFG_SCALE  # 4.0, DiT's sample.py default


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


def build_schedule(preset: str, device) -> DiffusionSchedule:
    """The preset's schedule: its ADM diffusion respaced to STEPS_PER_IMAGE, or DiT's (linear, 1000 betas,
    learned sigma) respaced to LATENT_STEPS_PER_IMAGE for a latent preset."""
    if preset in LATENT_PRESETS:
        return DiffusionSchedule(ScheduleConfig(sampling_steps=str(LATENT_STEPS_PER_IMAGE)), device=device)
    config = ScheduleConfig(**ADM_DIFFUSION_FLAGS[PRESETS[preset][1]], sampling_steps=str(STEPS_PER_IMAGE))
    return DiffusionSchedule(config, device=device)


def prior_class_map(unet) -> list[int] | None:
    """VE class -> prior class of a class-conditional prior: VE_CLASSES classes spread over its 1000."""
    return list(range(0, 1000, 1000 // VE_CLASSES))[:VE_CLASSES] if unet.num_classes else None


def latent_flops_per_image_step(preset: str) -> dict[str, int]:
    """bench/model_stats.py's counts for one image-step of a latent preset (FLOPs, meta device)."""
    dit_flags, vae_config, arch = LATENT_PRESETS[preset]
    image_size = dit_flags["input_size"] * 2 ** (len(vae_config["block_out_channels"]) - 1)
    stats = model_stats.latent_step_stats(dit_flags, vae_config, arch, CFG_SCALE, ve_resolution(image_size))
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


def make_sampler(unet, schedule, ve, class_map, backend="eager", options=None, reference=True, decoder=None,
                 noise="philox") -> Sampler:
    # A latent's x0 prediction is not clipped (DiT's sample.py: clip_denoised=False).
    guidance = GuidanceConfig(scale=1.0, beta=0.5, clip_x0=decoder is None)
    return Sampler(unet, schedule, ve, guidance, backend=backend, prior_class_map=class_map, noise=noise,
                   backend_options=options, reference_numerics=reference,  # (the compiled step ignores it)
                   decoder=decoder)


__all__ = ["CFG_SCALE", "DIT_PRESETS", "DIT_TINY_FLAGS", "HalfPrecisionPrior", "HalfPrecisionVE", "LATENT_PRESETS",
           "LATENT_STEPS_PER_IMAGE", "PRESETS", "STEPS_PER_IMAGE", "TINY_FLAGS", "TINY_VAE_CONFIG", "VE_CLASSES",
           "build_latent", "build_prior", "build_schedule", "build_ve", "flops_per_image_step",
           "latent_flops_per_image_step", "make_sampler", "prior_class_map", "redraw_zero_layers_", "ve_resolution"]
