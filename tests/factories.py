"""Small random-weight instances of the real architectures, shared by the tests."""
from __future__ import annotations

import math
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from igds_fast.models.resnet import resnet18
from igds_fast.preprocess import EncoderPreprocess
from igds_fast.ve import VariationalEstimator


def randomize_(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Fill every parameter with fresh random values: zero-initialised layers make tests vacuous."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, scale)
    return module


def max_pool_gap(module: torch.nn.Module, run: Callable[[], object]) -> float:
    """The smallest gap between the two largest inputs of any window of `module`'s MaxPool2d layers while
    run() runs (no autograd). Where it is within a few roundings, float32 and float64 may pick different
    elements and route the gradient differently."""
    gaps = []

    def record(pool, inputs, output):
        x = inputs[0].detach()
        pad_h, pad_w = _pair(pool.padding)
        windows = F.unfold(F.pad(x, (pad_w, pad_w, pad_h, pad_h), value=-math.inf), _pair(pool.kernel_size),
                           dilation=_pair(pool.dilation), stride=_pair(pool.stride or pool.kernel_size))
        kernel = math.prod(_pair(pool.kernel_size))
        top = windows.view(x.shape[0], x.shape[1], kernel, -1).topk(2, dim=2).values
        gaps.append(float((top[:, :, 0] - top[:, :, 1]).min()))

    pools = [m for m in module.modules() if isinstance(m, torch.nn.MaxPool2d)]
    if not pools:
        raise ValueError("the module has no MaxPool2d")
    handles = [pool.register_forward_hook(record) for pool in pools]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return min(gaps)


Drawn = TypeVar("Drawn")


def away_from_max_pool_ties(draw: Callable[[], Drawn], module: torch.nn.Module, forward: Callable[[Drawn], object],
                            margin: float, tries: int = 50) -> Drawn:
    """draw() again until forward(drawn) meets every max-pool window of `module` with its two largest inputs
    more than `margin` apart (tests/tolerances.py MAX_POOL_TIE_MARGIN says why). Each draw is fresh from
    the seeded generator, so a run is still one seed's."""
    for _ in range(tries):
        drawn = draw()
        if max_pool_gap(module, lambda: forward(drawn)) > margin:
            return drawn
    raise AssertionError(f"{tries} draws all put two max-pool inputs within {margin}")


def tiny_adm(image_size=16, channels=3, class_cond=True, learn_sigma=True, new_order=False, **overrides):
    from igds_fast.models.adm import ADMUNet

    flags = dict(
        image_size=image_size,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        attention_resolutions=str(image_size // 2),
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=new_order,
        dropout=0.0,
    )
    flags.update(overrides)
    unet = ADMUNet.from_flags(**flags)
    if channels != 3:
        raise ValueError("tiny_adm builds 3-channel priors (guided-diffusion's create_model fixes in_channels=3)")
    randomize_(unet, 0.05)
    return unet.eval()


def tiny_ve(num_classes=4, channels=3, resolution=16, tau=1.0, softplus_beta=3.0) -> VariationalEstimator:
    encoder = resnet18(num_classes=None, softplus_beta=softplus_beta, in_channels=channels)
    # Running statistics drawn at random too: the encoder runs in eval mode.
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    dim = encoder.feature_dim
    weight = torch.randn(num_classes, dim) / math.sqrt(dim) * 4
    bias = torch.randn(num_classes) * 0.1
    log_centroids = torch.log_softmax(torch.randn(num_classes, dim), dim=1)
    preprocess = EncoderPreprocess(resolution, (0.5,) * channels, (0.25,) * channels)
    names = [f"class{c}" for c in range(num_classes)]
    return VariationalEstimator(encoder, weight, bias, log_centroids, tau, preprocess, names).eval()


def digits_adm(scale: float = 0.05):
    """The digits demo's prior architecture (igds_fast.presets.digits), random weights.

    1 input channel, 16x16, 32 channels, channel_mult 1,2, attention only in the middle block (64
    channels, 2 heads of 32, T = 64, legacy order), learned sigma, class-conditional on 10 classes.
    """
    from igds_fast.models.adm import ADMUNet
    from igds_fast.train_prior import PriorTrainConfig

    unet = ADMUNet.from_flags(**PriorTrainConfig().unet_flags(16, 1, 10))
    return randomize_(unet, scale).eval()


def tiny_dit(input_size=8, depth=2, hidden_size=32, num_heads=2, num_classes=4, difffit_blocks=0, scale=0.05):
    """A DiT of the original layout (4 latent channels, patch 2, learned sigma, a null class), random weights."""
    from igds_fast.models.dit import DiT

    dit = DiT(input_size=input_size, patch_size=2, in_channels=4, hidden_size=hidden_size, depth=depth,
              num_heads=num_heads, num_classes=num_classes, difffit_blocks=difffit_blocks)
    pos_embed = dit.pos_embed.detach().clone()
    randomize_(dit, scale)
    with torch.no_grad():
        dit.pos_embed.copy_(pos_embed)  # the fixed sin-cos table, as every checkpoint holds it
    return dit.eval()


def tiny_vae(latent_channels=4, scale_factor=2, scaling_factor=0.18215):
    """A diffusers AutoencoderKL of SD's layout, small: block_out_channels (8, 16[, ...]), random weights."""
    from diffusers import AutoencoderKL

    blocks = int(math.log2(scale_factor)) + 1
    channels = tuple(8 * 2 ** k for k in range(blocks))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor,
    )
    randomize_(vae, 0.1)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
    return vae.eval()


def write_tiny_prior_and_ve(folder, class_names=("cat", "dog")) -> tuple[str, str]:
    """A 16-px ADM prior file and a VE bundle for `class_names`, written into `folder`: (prior, ve) paths.

    What a distill run needs from disk, in the real file layouts (save_prior / VariationalEstimator.save)."""
    import os

    from igds_fast.models.adm import ADMUNet
    from igds_fast.models.priors import save_prior
    from igds_fast.train_prior import PriorTrainConfig

    names = list(class_names)
    ve = tiny_ve(num_classes=len(names), channels=3, resolution=16)
    ve.class_names = names
    ve_path = os.path.join(folder, "ve.safetensors")
    ve.save(ve_path)
    arch = PriorTrainConfig(num_channels=32, channel_mult="1,2", num_res_blocks=1, noise_schedule="linear")
    flags = arch.unet_flags(16, 3, len(names))
    prior_path = os.path.join(folder, "prior.safetensors")
    save_prior(prior_path, ADMUNet.from_flags(**flags).eval(), flags, arch.schedule_config(), names)
    return prior_path, ve_path


class FakeStream:
    """A text stream that records what is written and says whether it is a terminal."""

    def __init__(self, tty=False):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass
