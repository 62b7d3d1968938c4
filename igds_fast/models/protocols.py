"""What a prior and a variational estimator must provide: the calls the eager, fused and compiled steps make.

Bring your own models: any UNet and any encoder work that satisfy these, checked when a Sampler is
built (a one-line IGDSInputError naming what is missing). guided-diffusion's own `UNetModel` (and the
UNets of its forks) is adapted as it is by `as_prior`: it has no `learn_sigma`, which is read off
`out_channels == 2 * in_channels`.

    PriorUNet                    __call__(x [B, C, H, W], timesteps [B] (training steps), y [B] or None)
                                 -> [B, 2C or C, H, W] (eps, then the learned-range v when learn_sigma);
                                 image_size, in_channels, learn_sigma, num_classes (None: unconditional)
    GuidanceEstimator            features(x [B, C, H, W] in [-1, 1]) -> z [B, d], differentiable in x;
                                 weight [C, d], bias [C], log_centroids [C, d] (log Q_y), tau, num_classes;
                                 optional: preprocess (its `mean` gives the channel count) and an
                                 `encoder` with forward_features (the compiled backend then runs a
                                 low-precision copy of it; otherwise `features` as given)
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from ..errors import IGDSInputError

PRIOR_ATTRIBUTES = ("image_size", "in_channels", "learn_sigma")
ESTIMATOR_ATTRIBUTES = ("features", "weight", "bias", "log_centroids", "tau", "num_classes")


@runtime_checkable
class PriorUNet(Protocol):
    image_size: int
    in_channels: int
    learn_sigma: bool
    num_classes: int | None

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class GuidanceEstimator(Protocol):
    weight: torch.Tensor
    bias: torch.Tensor
    log_centroids: torch.Tensor
    tau: float
    num_classes: int

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


class ForeignUNet(nn.Module):
    """A UNet of another code base (guided-diffusion's `UNetModel` and its forks) with the prior's attributes.

    forward(x, timesteps, y) calls the wrapped module as its own code does: `unet(x, timesteps, y=y)`
    for a class-conditional model, `unet(x, timesteps)` otherwise. low_precision_convs_only: such a
    model runs in low precision the way its own `use_fp16` does — convolution weights in the low
    dtype, everything else (time embedding, GroupNorm32 parameters, which upcast the input but not
    their weights) in float32, and its `dtype` attribute set (it casts its input to it).
    """

    low_precision_convs_only = True

    def __init__(self, unet: nn.Module, image_size: int, learn_sigma: bool, num_classes: int | None):
        super().__init__()
        self.unet = unet
        self.image_size, self.learn_sigma = int(image_size), bool(learn_sigma)
        self.in_channels = int(unet.in_channels)
        self.num_classes = None if num_classes is None else int(num_classes)

    def forward(self, x, timesteps, y=None):
        if self.num_classes is None:
            return self.unet(x, timesteps)
        return self.unet(x, timesteps, y=y)


def as_prior(unet, image_size: int | None = None, learn_sigma: bool | None = None, num_classes=...) -> PriorUNet:
    """`unet` itself when it has the prior's attributes, else a ForeignUNet around it; one-line errors.

    image_size / learn_sigma / num_classes: given, or read from the module (`image_size`,
    `out_channels == 2 * in_channels`, `num_classes`; `...` = read it, None = unconditional).
    """
    if not callable(unet):
        raise IGDSInputError(f"the prior must be callable as unet(x, timesteps, y), got {type(unet).__name__}")
    nothing_given = image_size is None and learn_sigma is None and num_classes is ...
    if nothing_given and all(hasattr(unet, name) for name in PRIOR_ATTRIBUTES):
        return unet
    if not hasattr(unet, "in_channels"):
        raise IGDSInputError(f"the prior {type(unet).__name__} has no 'in_channels' attribute")
    size = image_size if image_size is not None else getattr(unet, "image_size", None)
    if size is None:
        raise IGDSInputError(f"the prior {type(unet).__name__} has no 'image_size' attribute: pass image_size=")
    if learn_sigma is None:
        if hasattr(unet, "learn_sigma"):
            learn_sigma = bool(unet.learn_sigma)
        elif hasattr(unet, "out_channels"):
            if int(unet.out_channels) not in (int(unet.in_channels), 2 * int(unet.in_channels)):
                raise IGDSInputError(f"the prior outputs {unet.out_channels} channels for {unet.in_channels} in: "
                                     "expected eps (as many) or eps and v (twice as many)")
            learn_sigma = int(unet.out_channels) == 2 * int(unet.in_channels)
        else:
            raise IGDSInputError(f"the prior {type(unet).__name__} has neither 'learn_sigma' nor 'out_channels'")
    classes = getattr(unet, "num_classes", None) if num_classes is ... else num_classes
    if not isinstance(unet, nn.Module):
        raise IGDSInputError(f"a prior without the prior attributes must be an nn.Module, got {type(unet).__name__}")
    return ForeignUNet(unet, size, learn_sigma, classes)


def check_estimator(ve, channels: int) -> None:
    """One-line IGDSInputError unless `ve` provides what the steps call (GuidanceEstimator)."""
    missing = [name for name in ESTIMATOR_ATTRIBUTES if not hasattr(ve, name)]
    if missing:
        raise IGDSInputError(f"the variational estimator {type(ve).__name__} lacks {', '.join(missing)} "
                             "(features(x), weight, bias, log_centroids, tau, num_classes)")
    if not callable(ve.features):
        raise IGDSInputError(f"the variational estimator's features is not callable: {type(ve.features).__name__}")
    dim = ve.weight.shape[-1]
    if tuple(ve.log_centroids.shape) != (int(ve.num_classes), dim) or tuple(ve.bias.shape) != (int(ve.num_classes),):
        raise IGDSInputError(
            f"the variational estimator's weight {tuple(ve.weight.shape)}, bias {tuple(ve.bias.shape)} and "
            f"log_centroids {tuple(ve.log_centroids.shape)} do not fit {ve.num_classes} classes"
        )
    preprocess = getattr(ve, "preprocess", None)
    encoder_channels = len(preprocess.mean) if preprocess is not None and hasattr(preprocess, "mean") else None
    if encoder_channels is not None and encoder_channels != channels:
        raise IGDSInputError(f"the VE encoder reads {encoder_channels}-channel images but the prior makes {channels}"
                             + (" (a latent prior needs its decoder: pass decoder=)" if channels > encoder_channels else ""))


__all__ = ["ForeignUNet", "GuidanceEstimator", "PriorUNet", "as_prior", "check_estimator"]
