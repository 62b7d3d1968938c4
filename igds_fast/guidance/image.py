"""The guidance gradient in image space: `IGDSGuidance`, dJ/dx through the VE's preprocessing and encoder.

    x [B, C, H, W] in [-1, 1]  --preprocess-->  encoder input  --f-->  z [B, d]
    (J [B], dJ/dz [B, d])  = head(z, labels, W, b, log Q, beta, tau, gamma, group_ids)
    dJ/dx                  = vector-Jacobian product of z w.r.t. x with dJ/dz      [B, C, H, W]

A latent prior (DiT + VAE) puts its decoder in front: x is the latent [B, 4, S, S], the encoder sees
decode(x) [B, 3, 8S, 8S], and dJ/dx is the vector-Jacobian product through encoder and decoder.

One object, built once from the VE and the guidance settings, is the only way any step computes the
guidance, and the way a front end gets the IGDS gradient for its own sampler. The head is
swappable (autograd through `igds_objective`, the closed forms, or the fused Triton kernel) and so
is the encoder forward (the compiled backend passes its low-precision compiled copy) and the decoder
(likewise); their backward is always torch autograd.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import IGDSInputError
from ..profiling import nvtx_range
from .config import GuidanceConfig
from .objective import contextual_kl, diversity_infonce, igds_objective, igds_objective_and_grad, prototype_log_prob

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
        from ..kernels import guidance_head  # lazily: triton is only needed on this path

        return guidance_head
    raise IGDSInputError(f"unknown guidance head {name!r}; expected autograd, analytic or triton")


class IGDSGuidance:
    """guidance(x0, labels, group_ids=None, wrt=None) -> (J [B], dJ/d wrt) for images in [-1, 1].

    ve: the variational estimator (`features(x)`, `weight` [C, d], `bias` [C], `log_centroids`
        [C, d], `tau`); beta, gamma: the contextual and diversity weights; tau: None = the VE's;
    head: a GuidanceConfig.head name or a head callable (the signature of `autograd_head`);
    features: image -> z [B, d], differentiable; None = `ve.features`.
    decoder: latent -> image [B, C', H', W'] in ~[-1, 1], differentiable (models.vae.LatentDecoder:
        a latent prior's VAE), run in front of the encoder; None = the prior's samples are images.

    Call: x0 [B, C, H, W], the x0 prediction (an image, or a latent with a decoder); labels [B]
    (VE classes); group_ids [B] (diversity groups; None = the labels); wrt: the tensor to
    differentiate with respect to — None = the detached x0 itself (x0 mode); in x_t mode it is x_t,
    and x0 must have been computed from it with autograd enabled; return_features: also return the
    (detached) features z [B, d] (for a trace of the objective's terms, `terms`). NVTX:
    igds/decoder/forward, igds/encoder/forward, igds/head, igds/encoder/backward, igds/decoder/backward
    (the decoder's ranges only with a decoder).
    """

    def __init__(self, ve, beta: float = 0.0, tau: float | None = None, gamma: float = 0.0,
                 head: str | Head = "autograd", features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 decoder: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.ve = ve
        if beta is None:
            raise IGDSInputError("the guidance beta is not chosen (None): give a number, e.g. from a beta table "
                                 "with igds_fast.guidance.beta_table.resolve_beta")
        self.beta, self.gamma = float(beta), float(gamma)
        self.tau = float(ve.tau if tau is None else tau)
        if not self.tau > 0:
            raise IGDSInputError(f"tau must be positive, got {self.tau}")
        self.head = resolve_head(head) if isinstance(head, str) else head
        self.features = ve.features if features is None else features
        self.decoder = decoder

    @classmethod
    def from_config(cls, ve, config: GuidanceConfig, **operations) -> "IGDSGuidance":
        """The guidance of a GuidanceConfig (beta, tau, gamma, head); `operations`: head, features, decoder."""
        settings = dict(beta=config.beta, tau=config.tau, gamma=config.gamma, head=config.head)
        settings.update(operations)
        return cls(ve, **settings)

    def with_operations(self, head: str | Head | None = None, features=None, decoder=None) -> "IGDSGuidance":
        """The same guidance computed by another head, encoder forward and/or decoder (the fast backends')."""
        return IGDSGuidance(self.ve, self.beta, self.tau, self.gamma, self.head if head is None else head,
                            self.features if features is None else features,
                            self.decoder if decoder is None else decoder)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """The image the encoder sees: decoder(x0) for a latent prior, else x0 itself."""
        if self.decoder is None:
            expected = getattr(getattr(self.ve, "encoder", None), "in_channels", None)
            if expected is not None and x0.dim() == 4 and x0.shape[1] != expected:
                raise IGDSInputError(
                    f"the VE reads {expected}-channel images but the x0 prediction has {x0.shape[1]} channels: a "
                    "latent prior's (DiT's) predictions are decoded before the VE sees them -- pass the decoder, "
                    "IGDSGuidance(ve, decoder=igds_fast.load_vae(DIR))")
            return x0
        with nvtx_range("igds/decoder/forward"):
            return self.decoder(x0)

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Features z [B, d] of the x0 prediction (decoded first for a latent prior), differentiable."""
        return self.features(self.decode(x0))

    def head_gradient(self, z: torch.Tensor, labels, group_ids=None):
        """(J [B], dJ/dz [B, d]) of features z: the head alone."""
        ve = self.ve
        return self.head(z, labels, ve.weight, ve.bias, ve.log_centroids, self.beta, self.tau, self.gamma, group_ids)

    def terms(self, z: torch.Tensor, labels, group_ids=None) -> torch.Tensor:
        """The objective's terms per image [B, 4]: log p(y|x0), KL(P || Q_y), InfoNCE N (0 when gamma = 0),
        VE top-1 agreement (1.0 / 0.0). Torch ops only, no host read (capturable in a CUDA graph)."""
        ve = self.ve
        z = z.detach().float()
        log_prob = prototype_log_prob(z, labels, ve.weight, ve.bias)
        kl = contextual_kl(z, labels, ve.log_centroids, self.tau)
        infonce = (diversity_infonce(z, labels if group_ids is None else group_ids, self.tau) if self.gamma != 0.0
                   else torch.zeros_like(kl))
        top1 = ((z @ ve.weight.t() + ve.bias).argmax(dim=1) == labels).to(kl.dtype)
        return torch.stack([log_prob, kl, infonce, top1], dim=1)

    def __call__(self, image: torch.Tensor, labels, group_ids=None, wrt: torch.Tensor | None = None,
                 return_features: bool = False):
        with torch.enable_grad():
            if wrt is None:
                image = image.detach().requires_grad_(True)
                wrt = image
            decoded = self.decode(image)
            with nvtx_range("igds/encoder/forward"):
                features = self.features(decoded)
            with nvtx_range("igds/head"):
                objective, grad_features = self.head_gradient(features.detach(), labels, group_ids)
            grad_features = grad_features.to(features.dtype)
            if self.decoder is None:
                with nvtx_range("igds/encoder/backward"):
                    (grad,) = torch.autograd.grad(features, wrt, grad_outputs=grad_features)
            else:  # two products, so a profile shows the decoder's share of the backward on its own
                with nvtx_range("igds/encoder/backward"):
                    (grad_decoded,) = torch.autograd.grad(features, decoded, grad_outputs=grad_features)
                with nvtx_range("igds/decoder/backward"):
                    (grad,) = torch.autograd.grad(decoded, wrt, grad_outputs=grad_decoded.to(decoded.dtype))
        if return_features:
            return objective, grad, features.detach()
        return objective, grad


__all__ = ["Head", "IGDSGuidance", "autograd_head", "resolve_head"]
