"""Classifier-free guidance of a class-conditional prior, as DiT's `forward_with_cfg` computes it.

    out_c  = prior(x, t, y)          [B, 2C, H, W]   (eps, then the learned-range v)
    out_u  = prior(x, t, null)       [B, 2C, H, W]   (the same x, labels = the null class)
    eps    = out_u[:, :g] + s (out_c[:, :g] - out_u[:, :g])       g = guided_channels
    out    = [eps, out_c[:, g:]]     [B, 2C, H, W]

Both halves run as one batch [x; x] with labels [y; null], as DiT does. DiT's `sample.py` guides only
the first three channels (`eps, rest = out[:, :3], out[:, 3:]`, kept by its maintainers for
reproducibility: the fourth latent channel's eps and all of v come from the conditional half);
diffusers' DiTPipeline guides all four (`guided_channels=4`). scale 1 is the conditional model
alone, computed as such (one forward, not two).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import IGDSInputError


class ClassifierFreeGuidance(nn.Module):
    """prior(x [B, C, H, W], t [B], y [B]) with classifier-free guidance -> [B, 2C or C, H, W].

    prior: a class-conditional prior with a null class (`null_class`, e.g. DiT's row num_classes of
    its label table; or given); scale: the CFG scale s >= 0; guided_channels: how many leading output
    channels are guided (3 = DiT / MinimaxDiffusion, C = all eps channels, diffusers' pipeline).
    Carries the prior's attributes (image_size, in_channels, learn_sigma, num_classes, null_class).
    """

    def __init__(self, prior: nn.Module, scale: float, guided_channels: int = 3, null_class: int | None = None):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise IGDSInputError(f"the classifier-free guidance scale must be a finite number >= 0, got {scale!r}")
        null = getattr(prior, "null_class", None) if null_class is None else null_class
        if null is None:
            raise IGDSInputError(f"the prior {type(prior).__name__} has no null class: classifier-free guidance "
                                 "needs a model trained with label dropout (DiT's class_dropout_prob > 0)")
        channels = int(prior.in_channels)
        if isinstance(guided_channels, bool) or not isinstance(guided_channels, int) or not (
            1 <= guided_channels <= channels
        ):
            raise IGDSInputError(f"guided_channels must be an integer in [1, {channels}], got {guided_channels!r}")
        self.prior = prior
        self.scale, self.guided_channels, self.null_class = float(scale), guided_channels, int(null)
        self.image_size, self.in_channels = int(prior.image_size), channels
        self.learn_sigma, self.num_classes = bool(prior.learn_sigma), int(prior.num_classes)

    def forward(self, x, t, y):
        if self.scale == 1.0:
            return self.prior(x, t, y)
        batch = x.shape[0]
        out = self.prior(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)]))
        conditional, unconditional = out[:batch], out[batch:]
        g = self.guided_channels
        eps = unconditional[:, :g] + self.scale * (conditional[:, :g] - unconditional[:, :g])
        return torch.cat([eps, conditional[:, g:]], dim=1)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, guided_channels={self.guided_channels}, null_class={self.null_class}"


__all__ = ["ClassifierFreeGuidance"]
