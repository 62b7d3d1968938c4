"""The latent prior's decoder: a diffusers `AutoencoderKL` (Stable Diffusion's VAE) from a local folder.

    image = vae.decode(z / scaling_factor).sample      z [B, 4, S, S] -> image [B, 3, 8S, 8S] in ~[-1, 1]

as DiT's and MinimaxDiffusion's `sample.py` decode (`stabilityai/sd-vae-ft-mse` or `-ema`,
scaling_factor 0.18215). `LatentDecoder` is that call as a module with the attributes the sampler
reads (in_channels, out_channels, scale_factor); it is differentiable in z, which is how the IGDS
gradient of the VE on the decoded image reaches the latent. The image is not clamped here: the guidance
sees the decoder's own output (the sampler clamps its final images).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from ..artifacts import check_finite_weights
from ..errors import IGDSInputError

SD_VAE_SCALING_FACTOR = 0.18215


class LatentDecoder(nn.Module):
    """z [B, latent_channels, S, S] fp32 -> image [B, out_channels, S * scale_factor, ...] fp32.

    vae: a diffusers AutoencoderKL (or anything with `decode(z, return_dict=False) -> (image,)` and a
    `config` with latent_channels / out_channels / block_out_channels); scaling_factor: None = the
    VAE's config value (0.18215 for SD's VAE). The input is cast to the VAE's parameter dtype (a
    low-precision copy computes in its own dtype) and the image comes back float32.
    """

    def __init__(self, vae: nn.Module, scaling_factor: float | None = None):
        super().__init__()
        config = getattr(vae, "config", None)
        if not callable(getattr(vae, "decode", None)) or config is None:
            raise IGDSInputError(f"the VAE must be a diffusers AutoencoderKL (decode and config), got {type(vae).__name__}")
        factor = getattr(config, "scaling_factor", None) if scaling_factor is None else scaling_factor
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not (factor > 0 and math.isfinite(factor)):
            raise IGDSInputError(f"the VAE scaling factor must be a positive number, got {factor!r}")
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(factor)
        self.in_channels = int(config.latent_channels)
        self.out_channels = int(config.out_channels)
        self.scale_factor = 2 ** (len(config.block_out_channels) - 1)

    def forward(self, z):
        dtype = self.vae.decoder.conv_in.weight.dtype
        image = self.vae.decode((z / self.scaling_factor).to(dtype), return_dict=False)[0]
        return image.float()


def load_vae(directory: str | os.PathLike, device="cpu", scaling_factor: float | None = None) -> LatentDecoder:
    """The LatentDecoder of a local diffusers AutoencoderKL folder (config.json + weights), float32, eval.

    directory: the VAE folder itself, or a diffusers pipeline root with a `vae/` subfolder. Never
    downloads (local_files_only). One-line IGDSInputError for a missing or unreadable folder.
    """
    path = os.fspath(directory)
    if not os.path.isdir(path):
        raise IGDSInputError(f"the VAE folder {path} " + ("is a file, not a diffusers folder" if os.path.exists(path)
                                                          else "does not exist"))
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "vae", "config.json")):
        path = os.path.join(path, "vae")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise IGDSInputError(f"{path} is not a diffusers AutoencoderKL folder: no config.json")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise IGDSInputError("reading a VAE needs diffusers: pip install 'igds_fast[diffusers]'") from None
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32,
                                            low_cpu_mem_usage=False)  # no accelerate needed
    except Exception as exc:  # noqa: BLE001 — an unreadable folder is one input error
        raise IGDSInputError(f"cannot load the VAE from {path}: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]}") from None
    check_finite_weights(vae.state_dict(), f"VAE {path}")
    return LatentDecoder(vae.to(device), scaling_factor)


__all__ = ["LatentDecoder", "SD_VAE_SCALING_FACTOR", "load_vae"]
