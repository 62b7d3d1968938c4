"""The compiled backend's static device buffers of one batch shape, and the step body that reads only them.

CompiledStep binds every batch of a shape into one `BatchBuffers` and runs (or captures in a CUDA
graph, replayed for every step) `step_in_place` on it; the memory probe (memory.py) runs the same
body on buffers of its own.
"""
from __future__ import annotations

import torch

from ..step import GuidanceTrace, NonFiniteTracker, StepInputs, StepOps, reverse_step


class BatchBuffers:
    """Static device buffers of one batch shape; every graph of that shape reads/writes only these.

    x [B, C, H, W] fp32 (x_t in, x_{t-1} out), noise [B, C, H, W] (only for explicitly given noise),
    labels [B] int64, prior_labels [B] int64 (None for an unconditional prior), seeds [B] int64
    (Philox keys; has_seeds False when none were given), group_ids [B] int64 or None, index 0-d
    int64 (respaced step i), tracker (latest respaced index with a non-finite gradient, per image),
    trace (the GuidanceTrace of a traced batch; `tracing` says whether this batch records it).
    """

    def __init__(self, batch: int, image_shape, device, with_groups: bool, conditional: bool):
        self.x = torch.zeros(batch, *image_shape, device=device)
        self.noise: torch.Tensor | None = None
        self.labels = torch.zeros(batch, dtype=torch.long, device=device)
        self.prior_labels = torch.zeros(batch, dtype=torch.long, device=device) if conditional else None
        self.seeds = torch.zeros(batch, dtype=torch.long, device=device)
        self.has_seeds = False
        self.group_ids = torch.zeros(batch, dtype=torch.long, device=device) if with_groups else None
        self.index = torch.zeros((), dtype=torch.long, device=device)
        self.tracker = NonFiniteTracker(batch, device)
        self.trace: GuidanceTrace | None = None
        self.tracing = False
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def inputs(self, i: int, noise_kind: str) -> StepInputs:
        return StepInputs(i, self.index, self.labels, self.prior_labels, self.group_ids,
                          self.seeds if noise_kind == "philox" else None, self.noise if noise_kind == "tensor" else None,
                          self.trace if self.tracing else None)


def step_in_place(ops: StepOps, b: BatchBuffers, i: int, noise_kind: str, check_finite: bool) -> torch.Tensor:
    """One reverse step from the static buffers into b.x (ops.update writes x_{i-1} over x_t); returns
    the UNet output. noise_kind: "philox" (drawn from b.seeds), "tensor" (b.noise) or "none";
    check_finite: record non-finite gradients in b.tracker (GuidanceConfig.check_finite)."""
    tracker = b.tracker if check_finite else None
    return reverse_step(ops, b.x, b.inputs(i, noise_kind), tracker)[1]


__all__ = ["BatchBuffers", "step_in_place"]
