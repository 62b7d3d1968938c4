"""The terms of the VE objective L_VE = L_InfoNCE - lambda * E KL(P_x || Q_y) and the report's estimates.

P_x = softmax(z / tau) over the d trunk-feature coordinates, Q_y the class centroid (see the package
docstring). Pure tensor functions: no model, no data source.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..guidance.objective import contextual_kl


def label_entropy(labels: torch.Tensor, num_classes: int) -> float:
    """H(Y) in nats of the empirical label distribution: -sum_c p_c log p_c, p_c = count_c / N."""
    counts = torch.bincount(labels.to(torch.long).cpu(), minlength=num_classes).to(torch.float64)
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * probabilities.log()).sum())


def feature_log_softmax(features: torch.Tensor, tau: float) -> torch.Tensor:
    """log P_x = log softmax(z / tau) over the d coordinates; z [B, d] -> [B, d]."""
    return torch.log_softmax(features / tau, dim=1)


def cmi_term(features: torch.Tensor, labels: torch.Tensor, log_q: torch.Tensor, tau: float) -> torch.Tensor:
    """E[KL(P_x || Q_y)] over a batch (0-dim, differentiable in `features`; log_q is a constant).

    The VE loss subtracts lambda times this, so gradient descent on the loss moves the features
    *up* this term: each sample's feature softmax moves away from its class centroid.
    """
    return contextual_kl(features, labels, log_q.detach(), tau).mean()


@torch.no_grad()
def update_log_centroids(
    log_q: torch.Tensor, seen: torch.Tensor, log_p: torch.Tensor, labels: torch.Tensor, momentum: float
) -> None:
    """EMA of the class centroids in log space, in place: for every class c present in the batch,

        Q_c <- momentum * Q_c + (1 - momentum) * mean_{i: y_i = c} P_i      (Q_c <- batch mean if c unseen)

    log_q [C, d] float, seen [C] bool, log_p [B, d] (detached here), labels [B]. Log space
    (logsumexp) so that small tau, where P underflows, keeps finite centroids.
    """
    num_classes = log_q.shape[0]
    log_p = log_p.detach().to(log_q.dtype)
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    # Per-class logsumexp of log P: max-shifted scatter sum.
    index = labels[:, None].expand_as(log_p)
    class_max = torch.full_like(log_q, -math.inf).scatter_reduce(0, index, log_p, reduce="amax", include_self=True)
    shift = torch.where(present[:, None], class_max, torch.zeros_like(class_max))
    sums = torch.zeros_like(log_q).index_add_(0, labels, torch.exp(log_p - shift[labels]))
    batch_log_mean = shift + torch.log(sums) - torch.log(counts.clamp_min(1).to(log_q.dtype))[:, None]
    if momentum > 0:
        blended = torch.logaddexp(log_q + math.log(momentum), batch_log_mean + math.log1p(-momentum))
    else:
        blended = batch_log_mean
    fresh = present & ~seen  # first sighting: the batch mean, whatever the momentum
    updated = torch.where(fresh[:, None], batch_log_mean, blended)
    log_q.copy_(torch.where(present[:, None], updated, log_q))
    seen |= present


def info_nce_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    query_ids: torch.Tensor | None = None,
    queue_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo's InfoNCE: queries, keys [B, D] (L2-normalised), queue [K, D] (normalised negatives).

    logits_i = [q_i.k_i, q_i.queue_1, ..., q_i.queue_K] / temperature; loss = CE(logits, 0).
    Queue entries with queue_ids == query_ids[i] (the query's own image) are excluded from row i.
    """
    positive = (queries * keys).sum(dim=1, keepdim=True)
    negative = queries @ queue.t()
    if query_ids is not None and queue_ids is not None:
        negative = negative.masked_fill(query_ids[:, None] == queue_ids[None, :], -math.inf)
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device))


def prototype_information(logits: torch.Tensor, labels: torch.Tensor, entropy: float) -> tuple[float, float]:
    """(H(Y) - CE, CE): the prototype information estimate and the mean cross-entropy (nats).

    logits [N, C], labels [N]; CE = mean_i -log softmax(logits_i)_{y_i}.
    """
    cross_entropy = float(F.cross_entropy(logits.to(torch.float64), labels.to(torch.long)))
    return entropy - cross_entropy, cross_entropy


class SplitStatistics:
    """The report's estimates over one split, accumulated chunk by chunk (nothing of size N kept).

    With logits = z W^T + b (float32, as the VE computes them):
        accuracy  = 100 * #(argmax logits = y) / N
        CE        = sum_i -log softmax(logits_i)_{y_i} / N          (float64)
        E KL      = sum_i KL(softmax(z_i / tau) || Q_{y_i}) / N      (float64, contextual_kl)
    result(H(Y)) gives the report's fields; prototype information = H(Y) - CE.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, log_q: torch.Tensor, tau: float):
        self.weight, self.bias, self.tau = weight, bias, tau
        self.log_q = log_q.to(torch.float64)
        self.count, self.correct, self.cross_entropy_sum, self.kl_sum = 0, 0, 0.0, 0.0

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a chunk: features z [B, d] float32, labels [B] long (same device as the head)."""
        logits = F.linear(features, self.weight, self.bias)
        self.count += int(labels.shape[0])
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.cross_entropy_sum += float(F.cross_entropy(logits.to(torch.float64), labels, reduction="sum"))
        self.kl_sum += float(contextual_kl(features.to(torch.float64), labels, self.log_q, self.tau).sum())

    def result(self, entropy: float) -> dict:
        cross_entropy = self.cross_entropy_sum / self.count
        return {
            "images": self.count,
            "accuracy": self.correct / self.count * 100.0,
            "cross_entropy": cross_entropy,
            "prototype_information": entropy - cross_entropy,
            "contextual_information": self.kl_sum / self.count,
        }

    def state(self) -> dict:
        """The sums as JSON-able numbers (exact through json)."""
        return {"count": self.count, "correct": self.correct, "cross_entropy_sum": self.cross_entropy_sum,
                "kl_sum": self.kl_sum}

    @classmethod
    def from_state(cls, weight, bias, log_q, tau: float, state: dict) -> "SplitStatistics":
        statistics = cls(weight, bias, log_q, tau)
        statistics.count, statistics.correct = int(state["count"]), int(state["correct"])
        statistics.cross_entropy_sum, statistics.kl_sum = float(state["cross_entropy_sum"]), float(state["kl_sum"])
        return statistics
