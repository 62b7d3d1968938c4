"""`igds-fast distill --trace`: the guidance terms of every step, per class, as OUT/trace.json and OUT/trace.png.

Each batch's trace (Sampler.sample(..., trace=True): per step and image, read once per batch) is
summed per class on the CPU; the files hold the mean over the images this run sampled (a resumed run
covers the images it sampled itself), against the sampling step (0 = the first, from noise).
"""
from __future__ import annotations

import math
import os

import torch

from ..imageio import write_json_atomic
from ..plots import save_line_panels
from ..sampling.step import TRACE_TERMS

TRACE_JSON = "trace.json"
TRACE_PNG = "trace.png"
TITLES = {"log_p_y": "log p(y|x0)", "kl": "KL(P || Q_y)", "infonce": "InfoNCE", "grad_norm": "|dJ/dx|",
          "top1": "VE top-1 agreement"}


class TraceAccumulator:
    """Sums and counts [N steps, classes, terms] of the traced images, NaN (unguided) skipped."""

    def __init__(self, num_steps: int, class_keys: list[str]):
        self.class_keys = list(class_keys)
        shape = (num_steps, len(class_keys), len(TRACE_TERMS))
        self.sums = torch.zeros(shape, dtype=torch.float64)
        self.counts = torch.zeros(shape, dtype=torch.float64)

    def add(self, trace: dict[str, torch.Tensor], class_indices: list[int]) -> None:
        """trace: {term: [N, B]} of one batch; class_indices: the class position of each of the B images."""
        values = torch.stack([trace[name].double() for name in TRACE_TERMS], dim=-1)  # [N, B, T]
        finite = torch.isfinite(values)
        index = torch.tensor(class_indices, dtype=torch.long)
        self.sums.index_add_(1, index, torch.where(finite, values, 0.0))
        self.counts.index_add_(1, index, finite.double())

    def to_state(self) -> dict:
        return {"sums": self.sums.tolist(), "counts": self.counts.tolist()}

    def merge(self, state: dict) -> None:
        self.sums += torch.tensor(state["sums"], dtype=torch.float64)
        self.counts += torch.tensor(state["counts"], dtype=torch.float64)

    def write(self, out: str, timestep_map: list[int]) -> dict:
        """OUT/trace.json and OUT/trace.png (atomically); returns the JSON document."""
        means = torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1), float("nan"))
        num_steps = means.shape[0]
        # Row i is respaced index i; sampling step s = N-1-i runs first-to-last.
        order = list(reversed(range(num_steps)))

        def series(c, k):
            return [None if math.isnan(float(means[i, c, k])) else round(float(means[i, c, k]), 6) for i in order]

        document = {
            "terms": list(TRACE_TERMS),
            "sampling_step": list(range(num_steps)),
            "timestep": [int(timestep_map[i]) for i in order],
            "classes": {key: {name: series(c, k) for k, name in enumerate(TRACE_TERMS)}
                        for c, key in enumerate(self.class_keys)},
            "images": {key: int(self.counts[:, c, 0].max()) for c, key in enumerate(self.class_keys)},
        }
        write_json_atomic(os.path.join(out, TRACE_JSON), document)
        panels = [(TITLES[name], {key: document["classes"][key][name] for key in self.class_keys}) for name in TRACE_TERMS]
        save_line_panels(os.path.join(out, TRACE_PNG), document["sampling_step"], panels, x_label="step")
        return document


__all__ = ["TRACE_JSON", "TRACE_PNG", "TraceAccumulator"]
