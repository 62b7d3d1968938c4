"""A diffusers `UNet2DModel` behind the ADMUNet call interface, so diffusers-trained priors plug in.

    unet = load_diffusers_unet("path/to/unet_dir")      # a local save_pretrained() folder, never a hub id
    eps_and_v = unet(x [B, C, H, W], timesteps [B], y [B] or None)   -> [B, C or 2C, H, W]

Attributes match ADMUNet's: image_size, in_channels, out_channels, learn_sigma (out = 2 x in),
num_classes (the config's num_class_embeds, None when unconditional).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..errors import IGDSInputError


class DiffusersUNetPrior(nn.Module):
    """Wraps a diffusers UNet2DModel: forward(x, timesteps, y) -> model output tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        config = model.config
        size = config.sample_size
        sizes = [size] if isinstance(size, int) else list(size or [])
        if not sizes or any(s != sizes[0] for s in sizes):
            # The sampler draws square noise of image_size; nothing else can be inferred safely.
            raise IGDSInputError(f"diffusers UNet config needs a square sample_size, got {size!r}")
        self.image_size = int(sizes[0])
        self.in_channels = int(config.in_channels)
        self.out_channels = int(config.out_channels)
        self.learn_sigma = self.out_channels == 2 * self.in_channels
        classes = getattr(config, "num_class_embeds", None)
        self.num_classes = int(classes) if classes else None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, in, H, W], timesteps [B] (original training steps), y [B] or None -> [B, out, H, W]."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2:] != (self.image_size, self.image_size):
            raise IGDSInputError(
                f"diffusers UNet expects [B, {self.in_channels}, {self.image_size}, {self.image_size}] images, "
                f"got {tuple(x.shape)}"
            )
        if (y is None) != (self.num_classes is None):
            raise IGDSInputError(
                "class labels are required by a class-conditional UNet" if y is None
                else "labels given to an unconditional UNet"
            )
        return self.model(x, timesteps, class_labels=y, return_dict=False)[0]


def load_diffusers_unet(directory: str | os.PathLike, device="cpu") -> DiffusersUNetPrior:
    """Load a UNet2DModel from a local save_pretrained() directory (eval mode); nothing is downloaded.

    diffusers is imported here, so it is only needed by users of this loader.
    :raises IGDSInputError: (one line) diffusers missing, no config.json, or an unloadable folder.
    """
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise IGDSInputError(f"not a diffusers model folder (no config.json): {directory}")
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise IGDSInputError("diffusers is not installed: pip install diffusers") from None
    try:
        model = UNet2DModel.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # noqa: BLE001 — any unreadable folder is one input error
        raise IGDSInputError(f"cannot load a UNet2DModel from {directory}: {type(error).__name__}: {error}") from None
    return DiffusersUNetPrior(model).to(device).eval()
