"""The IGDS objective J and its gradient with respect to the encoder features: the eager reference.

Per generated sample i with target class y_i and encoder feature z_i (IGDS_SPEC sections 3 and 4):

    J_i = log softmax(W z_i + b)_{y_i}                         prototype term   (C classes)
        + beta  * KL( softmax(z_i / tau) || Q_{y_i} )          contextual term  (softmax over d coords)
        - gamma * N_i                                          diversity term   (optional, gamma = 0)

    N_i = -log( exp(s_ii) / sum_{j in G(i)} exp(s_ij) ),  s_ij = <zhat_i, zhat_j> / tau,
          zhat = z / ||z||, G(i) = the samples of the batch sharing i's group id.

Shapes: z [B, d], labels [B] (long), W [C, d], b [C], log Q [C, d] (log-centroids), group_ids [B].

The guidance gradient is that of sum_i J_i. The prototype and contextual terms of J_i depend on
z_i only; the diversity term couples the members of a group, so dJ/dz below is always the gradient
of the batch sum (the quantity the sampler ascends).

Analytic gradients (`igds_objective_and_grad`, the reference the Triton head must match):

    d proto_i / d z_i = W^T (onehot(y_i) - p_i),                  p_i = softmax(W z_i + b)
    d KL_i / d z_i    = (1/tau) P_i * (log P_i - log Q_{y_i} - KL_i),   P_i = softmax(z_i / tau)
    d sum N / d zhat  = (1/tau) (A + A^T) zhat - (2/tau) zhat,     A_ij = softmax_{j in G(i)}(s_ij)
    d / d z           = (g - zhat <zhat, g>) / ||z||              (through the normalisation)

All functions are pure torch (differentiable), do no host synchronisation and accept any float
dtype (accumulating in the input dtype; the sampler's reference runs float32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import IGDSInputError
from ..head_contract import NORM_EPS, check_head_shapes

def prototype_log_prob(z, labels, weight, bias):
    """log softmax(W z + b)_y per sample: [B]."""
    logits = z @ weight.t() + bias
    return torch.log_softmax(logits, dim=1).gather(1, labels.long()[:, None]).squeeze(1)


def centroid_kl(log_p, log_centroids, labels):
    """KL(P_i || Q_{y_i}) = sum_j P_ij (log P_ij - log Q_{y_i, j}) per sample: log P [B, d], log Q [C, d] -> [B].

    The one place the contextual KL is written: the guidance objective, the VE's CMI training term
    and beta calibration's scores all compute it here.
    """
    log_q = log_centroids.index_select(0, labels.long())
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def contextual_kl(z, labels, log_centroids, tau: float):
    """KL(softmax(z / tau) || Q_y) per sample, the softmax over the d feature coordinates: [B]."""
    return centroid_kl(torch.log_softmax(z / tau, dim=1), log_centroids, labels)


def diversity_infonce(z, group_ids, tau: float):
    """InfoNCE N_i among same-group samples of the batch: [B]. A group of one gives N_i = 0."""
    zhat = F.normalize(z, dim=1, eps=NORM_EPS)
    similarity = zhat @ zhat.t() / tau
    same_group = group_ids[:, None] == group_ids[None, :]
    masked = similarity.masked_fill(~same_group, float("-inf"))
    return torch.logsumexp(masked, dim=1) - similarity.diagonal()


def igds_objective(
    features,
    labels,
    weight,
    bias,
    log_centroids,
    beta: float,
    tau: float,
    gamma: float = 0.0,
    group_ids=None,
):
    """Per-sample IGDS objective J [B] (see the module docstring).

    group_ids defaults to the labels: the diversity term groups the same-class samples of the batch.
    """
    check_head_shapes(features, labels, weight, bias, log_centroids, group_ids)
    _check_scalars(tau)
    objective = prototype_log_prob(features, labels, weight, bias)
    if beta != 0.0:
        objective = objective + beta * contextual_kl(features, labels, log_centroids, tau)
    if gamma != 0.0:
        groups = labels if group_ids is None else group_ids
        objective = objective - gamma * diversity_infonce(features, groups, tau)
    return objective


def igds_objective_and_grad(
    features,
    labels,
    weight,
    bias,
    log_centroids,
    beta: float,
    tau: float,
    gamma: float = 0.0,
    group_ids=None,
):
    """(J [B], d(sum_i J_i)/dz [B, d]) from the closed forms in the module docstring, no autograd.

    This is the eager reference of the fused Triton guidance head (`igds_fast.kernels.guidance_head`).
    """
    check_head_shapes(features, labels, weight, bias, log_centroids, group_ids)
    _check_scalars(tau)
    z = features
    labels = labels.long()
    logits = z @ weight.t() + bias
    log_p_class = torch.log_softmax(logits, dim=1)
    objective = log_p_class.gather(1, labels[:, None]).squeeze(1)
    residual = -log_p_class.exp()
    residual.scatter_add_(1, labels[:, None], torch.ones_like(residual[:, :1]))
    grad = residual @ weight

    if beta != 0.0:
        log_p = torch.log_softmax(z / tau, dim=1)
        p = log_p.exp()
        log_ratio = log_p - log_centroids.index_select(0, labels)
        kl = (p * log_ratio).sum(dim=1)
        objective = objective + beta * kl
        grad = grad + (beta / tau) * p * (log_ratio - kl[:, None])

    if gamma != 0.0:
        groups = labels if group_ids is None else group_ids
        norm = z.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        zhat = z / norm
        similarity = zhat @ zhat.t() / tau
        same_group = groups[:, None] == groups[None, :]
        masked = similarity.masked_fill(~same_group, float("-inf"))
        log_normaliser = torch.logsumexp(masked, dim=1)
        objective = objective - gamma * (log_normaliser - similarity.diagonal())
        attention = torch.exp(masked - log_normaliser[:, None])  # A_ij, zero outside the group
        grad_zhat = ((attention + attention.t()) @ zhat - 2.0 * zhat) / tau
        grad_z = (grad_zhat - zhat * (zhat * grad_zhat).sum(dim=1, keepdim=True)) / norm
        grad = grad - gamma * grad_z
    return objective, grad


def _check_scalars(tau) -> None:
    if isinstance(tau, (int, float)) and not tau > 0:
        raise IGDSInputError(f"tau must be positive, got {tau}")
