"""The guidance head's contract: what the eager objective and the Triton head both accept.

Shapes (no values read: nothing here synchronises with the device) and the one constant both
implementations must share. A module of its own so that `kernels/` can import it without importing
the guidance package above it.
"""
from __future__ import annotations

import torch

from .errors import IGDSInputError

NORM_EPS = 1e-12  # as F.normalize: ||z|| is clamped here before dividing


def check_head_shapes(z, labels, weight, bias, log_centroids, group_ids=None) -> None:
    """Shape/dtype checks only (no values are read: nothing here synchronises with the device)."""
    if z.dim() != 2:
        raise IGDSInputError(f"features must be [B, d], got shape {tuple(z.shape)}")
    batch, dim = z.shape
    if labels.shape != (batch,):
        raise IGDSInputError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise IGDSInputError(f"labels must be an integer tensor, got {labels.dtype}")
    if weight.dim() != 2 or weight.shape[1] != dim:
        raise IGDSInputError(f"classifier weight must be [C, {dim}], got {tuple(weight.shape)}")
    classes = weight.shape[0]
    if bias.shape != (classes,):
        raise IGDSInputError(f"classifier bias must have shape ({classes},), got {tuple(bias.shape)}")
    if log_centroids.shape != (classes, dim):
        raise IGDSInputError(
            f"log_centroids must be [{classes}, {dim}], got {tuple(log_centroids.shape)}"
        )
    if group_ids is not None and group_ids.shape != (batch,):
        raise IGDSInputError(f"group_ids must have shape ({batch},), got {tuple(group_ids.shape)}")


__all__ = ["NORM_EPS", "check_head_shapes"]
