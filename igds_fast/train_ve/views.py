"""The two random views per image of the contrastive stage: crop (+ flip) and jitter, batched and seeded."""
from __future__ import annotations

import torch

from ..evaluate.augment import crop_and_flip
from .config import VETrainConfig


def random_view(images: torch.Tensor, generator: torch.Generator, config: VETrainConfig) -> torch.Tensor:
    """One random view of each image: crop (+ flip) then jitter; [B, C, H, W] in [-1, 1] -> same shape.

    Jitter (strength j, per image): contrast c ~ U(1-j, 1+j) about the image mean, brightness
    b ~ U(-j, j) (in [-1, 1] units, i.e. +-j/2 of the [0, 1] range), and for RGB a saturation
    s ~ U(1-j, 1+j) (blend with the luma image). Clamped back to [-1, 1].
    """
    views = crop_and_flip(images, generator, scale=config.crop_scale, crop=True, flip=config.horizontal_flip)
    strength = config.jitter
    if strength <= 0:
        return views
    batch = images.shape[0]
    device = generator.device

    def uniform(low, high):
        return (torch.rand(batch, generator=generator, device=device) * (high - low) + low).view(-1, 1, 1, 1)

    contrast, brightness = uniform(1 - strength, 1 + strength), uniform(-strength, strength)
    if images.shape[1] == 3:
        saturation = uniform(1 - strength, 1 + strength).to(views.device)
        luma = (0.299 * views[:, 0:1] + 0.587 * views[:, 1:2] + 0.114 * views[:, 2:3])
        views = luma + saturation * (views - luma)
    image_mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = (views - image_mean) * contrast.to(views.device) + image_mean + brightness.to(views.device)
    return views.clamp(-1.0, 1.0)
