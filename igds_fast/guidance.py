"""The guidance gradient in image space: dJ/dx through the VE's preprocessing and encoder.

    x [B, C, H, W] in [-1, 1]  --preprocess-->  encoder input  --f-->  z [B, d]
    (J [B], dJ/dz [B, d])  = head(z, labels, W, b, log Q, beta, tau, gamma, group_ids)
    dJ/dx                  = vector-Jacobian product of z w.r.t. x with dJ/dz      [B, C, H, W]

The head is swappable (autograd through `igds_objective`, closed forms, or the fused Triton
kernel); the encoder backward is always torch autograd.
"""
from __future__ import annotations

from typing import Callable

import torch

from .objective import igds_objective, igds_objective_and_grad
from .profiling import nvtx_range

Head = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def autograd_head(z, labels, weight, bias, log_centroids, beta, tau, gamma=0.0, group_ids=None):
    """(J, d sum J / dz) by torch autograd through the eager objective: the reference of references."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        objective = igds_objective(leaf, labels, weight, bias, log_centroids, beta, tau, gamma, group_ids)
        (grad,) = torch.autograd.grad(objective.sum(), leaf)
    return objective.detach(), grad


def resolve_head(name: str) -> Head:
    """The guidance head implementation for a GuidanceConfig.head name."""
    if name == "autograd":
        return autograd_head
    if name == "analytic":
        return igds_objective_and_grad
    if name == "triton":
        from .kernels import guidance_head  # imported lazily: triton is only needed on this path

        return guidance_head
    raise ValueError(f"unknown guidance head {name!r}")


def image_guidance(
    image: torch.Tensor,
    labels: torch.Tensor,
    ve,
    beta: float,
    tau: float,
    gamma: float = 0.0,
    group_ids: torch.Tensor | None = None,
    head: Head = autograd_head,
    wrt: torch.Tensor | None = None,
    features_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """(J [B], dJ/d wrt) for images in [-1, 1].

    image: [B, C, H, W], the encoder's input before preprocessing (the x0 prediction).
    wrt: the tensor to differentiate with respect to. None = the detached `image` itself (x0 mode);
        in x_t mode it is x_t and `image` must have been computed from it with autograd enabled.
    features_fn: image -> z [B, d] (differentiable); None = `ve.features` (the compiled backend
        passes its low-precision compiled encoder).
    NVTX: igds/encoder/forward, igds/head, igds/encoder/backward.
    """
    features_fn = ve.features if features_fn is None else features_fn
    with torch.enable_grad():
        if wrt is None:
            image = image.detach().requires_grad_(True)
            wrt = image
        with nvtx_range("igds/encoder/forward"):
            features = features_fn(image)
        with nvtx_range("igds/head"):
            objective, grad_features = head(
                features.detach(),
                labels,
                ve.weight,
                ve.bias,
                ve.log_centroids,
                beta,
                tau,
                gamma,
                group_ids,
            )
        with nvtx_range("igds/encoder/backward"):
            (grad,) = torch.autograd.grad(features, wrt, grad_outputs=grad_features.to(features.dtype))
    return objective, grad
