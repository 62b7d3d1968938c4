"""The float32 reference step: plain torch, no compile, no graphs; every other backend must match it.

`EagerStep` runs `reverse_step` with the torch operations of `StepOps`. On CUDA it runs under
`fp32_reference_math` (no TF32, deterministic cuDNN), entered once per batch by the sampler's loop.
`batch_invariant=True` steps each image — each diversity group when gamma != 0, which is coupled on
purpose — on its own: batched convolutions and GEMMs may pick other algorithms (and so other
roundings) for other batch sizes, so only then are an image's bytes independent of its batch.
"""
from __future__ import annotations

import contextlib

import torch

from .step import GuidanceTrace, NonFiniteTracker, StepContext, StepInputs, StepOps, reverse_step


@contextlib.contextmanager
def fp32_reference_math(device: torch.device):
    """On CUDA: float32 convolutions and matmuls really in float32, with deterministic cuDNN algorithms.

    PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default, and a front end may have
    lowered the matmul precision; the eager reference must not. cudnn.deterministic (with benchmark
    off) fixes the algorithms, so the input-gradient backward of the encoder gives the same bits run
    to run. Settings are restored on exit; a no-op off CUDA (CPU math is float32 and deterministic).
    """
    if torch.device(device).type != "cuda":
        yield
        return
    precision = torch.get_float32_matmul_precision()
    if precision != "highest":
        torch.set_float32_matmul_precision("highest")  # the high-level API: safe beside either TF32 API
    try:
        with torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=False
        ):
            yield
    finally:
        if precision != "highest":
            torch.set_float32_matmul_precision(precision)


class BatchState:
    """What stays the same for a batch: labels, prior labels, groups, noise keys, finite tracker, trace.

    Built once per batch (`begin_batch`), so no step re-gathers the class map or re-copies seeds.
    members: batch-invariant mode's parts, each stepped alone (None: the whole batch at once);
    trace: the GuidanceTrace the guided steps write (None: not traced).
    """

    def __init__(self, context: StepContext, labels, seeds, group_ids, members=None, trace: bool = False):
        self.labels = labels
        self.prior_labels = context.prior_labels(labels)
        self.group_ids = group_ids
        self.seeds = None if seeds is None else context.noise_keys(seeds, context.device)
        self.members = members
        checks_finite = context.guidance_config.check_finite
        self.tracker = NonFiniteTracker(labels.shape[0], context.device) if checks_finite else None
        self.trace = GuidanceTrace(context.num_steps, labels.shape[0], context.device) if trace else None

    def inputs(self, i: int, index, noise=None) -> StepInputs:
        return StepInputs(i, index, self.labels, self.prior_labels, self.group_ids, self.seeds, noise, self.trace)


class EagerStep:
    """The stepper of `Sampler(backend="eager")`: the float32 reference (module docstring; surface:
    sampling.backends.Stepper)."""

    batch_size: int | None = None  # no batch size of its own: the caller's
    self_check_report: dict | None = None  # nothing to check: this is the reference

    def __init__(self, context: StepContext, batch_invariant: bool = False):
        self.context = context
        self.ops = StepOps(context)
        self.batch_invariant = bool(batch_invariant)
        # Device-resident step indices (views of one arange): the index the kernels read (FusedStep).
        # The torch operations use the host i.
        self.step_indices = torch.arange(context.num_steps, dtype=torch.int64, device=context.device)
        self.last_model_output: torch.Tensor | None = None  # of the latest step (the loop's callback)

    def numerics(self):
        """The numerics of this backend's steps: the true float32 reference, or PyTorch's defaults."""
        return fp32_reference_math(self.context.device) if self.context.reference_numerics else contextlib.nullcontext()

    # ---- the seam ---------------------------------------------------------------------------------
    def begin_batch(self, x, labels, seeds, group_ids=None, trace: bool = False):
        """(x, BatchState) of a new batch; the loop then calls advance(x, i, state) for i = N-1 .. 0."""
        members = self._members(labels, group_ids, x.shape[0])
        return x, BatchState(self.context, labels, seeds, group_ids, members, trace)

    def advance(self, x, i: int, state: BatchState, noise=None) -> torch.Tensor:
        """x_{i-1} from x_i = x within a batch (the caller holds `numerics()`)."""
        inputs = state.inputs(i, self.step_indices[i], noise)
        if state.members is None:
            out, self.last_model_output = reverse_step(self.ops, x, inputs, state.tracker)
            return out
        if inputs.noise is None and inputs.seeds is not None and self.context.draws_noise(i):
            inputs.noise = self.context.noise_source(inputs.seeds, i, x.shape[1:], x.device)
        out = torch.empty_like(x)
        model_output = None
        for rows in state.members:
            part = StepInputs(
                i, inputs.index, inputs.labels[rows], None if inputs.prior_labels is None else inputs.prior_labels[rows],
                None if inputs.group_ids is None else inputs.group_ids[rows], None,
                None if inputs.noise is None else inputs.noise[rows], inputs.trace,
            )
            out[rows], part_output = reverse_step(self.ops, x[rows], part, state.tracker, rows)
            if model_output is None:
                model_output = x.new_empty((x.shape[0], *part_output.shape[1:]))
            model_output[rows] = part_output
        self.last_model_output = model_output
        return out

    def finish_batch(self, state: BatchState) -> None:
        """Raise the non-finite-gradient error of the batch, if any (one host read)."""
        if state.tracker is not None:
            state.tracker.raise_if_any(state.labels, self.context.num_steps)

    def __call__(self, x, i: int, labels, noise=None, group_ids=None, seeds=None) -> torch.Tensor:
        """One step on its own (a front end's loop): the batch set up, stepped and checked at once."""
        with self.numerics():
            x, state = self.begin_batch(x, labels, seeds, group_ids)
            result = self.advance(x, i, state, noise)
            self.finish_batch(state)
        return result

    def _members(self, labels, group_ids, batch: int):
        if not self.batch_invariant or batch == 1:
            return None
        if self.context.guidance_config.gamma != 0.0:
            keys = labels if group_ids is None else group_ids
            return [(keys == key).nonzero().flatten() for key in torch.unique(keys)]
        return [torch.tensor([b], device=labels.device) for b in range(batch)]


__all__ = ["BatchState", "EagerStep", "fp32_reference_math"]
