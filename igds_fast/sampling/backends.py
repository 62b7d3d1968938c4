"""The one place that maps a backend name (and a noise source name) to what implements it.

Imports are lazy here, and only here in the sampling layer: the Triton kernels (and with them
triton) load only for a backend or noise source that uses them, the compile machinery only for
the compiled backend.

`check_triton_runs_on` is the one check, shared by every Triton user (the compiled backend, Philox
noise, the fused step; the distill planner calls it before any model loads), that the kernels can
run on a device: on a CPU only in Triton's interpreter, which must be chosen before triton loads.
"""
from __future__ import annotations

import os
from typing import ContextManager, Protocol, runtime_checkable

import torch

from ..errors import IGDSInputError
from ..seeding import seeded_normal
from .eager import EagerStep
from .step import StepContext

# eager: the float32 reference (sampling.eager); fused: the same step on the Triton guidance head and
# fused DDPM update, eager UNet (sampling.fused); compiled: low-precision compiled copies, CUDA graphs.
BACKENDS = ("eager", "fused", "compiled")
IN_KERNEL_NOISE_BACKENDS = ("fused", "compiled")  # their update kernel draws Philox noise itself
NOISE_SOURCES = ("torch", "philox")
# One message for every way of reaching the Triton kernels on a CPU without the interpreter.
TRITON_ON_CPU_MESSAGE = (
    "the Triton kernels (--backend compiled, --noise philox, --head triton) run on a CPU only in the Triton "
    "interpreter: set TRITON_INTERPRET=1 in the environment before igds_fast.kernels (or triton) is first imported"
)


@runtime_checkable
class Stepper(Protocol):
    """The public surface of a backend's step object (`Sampler.stepper`: EagerStep, FusedStep, CompiledStep).

    The sampler's loop (`Sampler.batch`, `SamplingRun.step`) drives it, and nothing else needs to:

        with stepper.numerics():                                    once per batch
            x, batch = stepper.begin_batch(x_T, labels, seeds, group_ids, trace)
            x = stepper.advance(x, i, batch)                        i = N-1 .. 0, no host sync
            stepper.finish_batch(batch)                             the one host read (finite check)

    numerics(): the context the batch's steps run in (the eager reference's float32 settings on CUDA,
        PyTorch's defaults for the fused step, cuDNN benchmark mode for the compiled one).
    begin_batch(x [B, C, H, W], labels [B] (VE classes, on the device), seeds (B ints) or None,
        group_ids [B] or None, trace) -> (x, batch): the x to step (the compiled backend's static
        buffer) and what stays the same for the batch (its `trace`: the GuidanceTrace, or None).
    advance(x, i, batch, noise=None) -> x_{i-1}: one reverse step at respaced index i.
    finish_batch(batch): raise the non-finite-gradient error of the batch, if any.
    __call__(x, i, labels, noise=None, group_ids=None, seeds=None) -> x_{i-1}: one step on its own
        (`Sampler.step`).
    last_model_output: the UNet output of the latest step [B, 2C or C, H, W] (a static buffer in the
        compiled backend's graph mode), None before the first.
    batch_size: the backend's own batch size (compiled: given, or chosen from free device memory),
        None for eager and fused.
    self_check_report: the compiled backend's passed first-step self-check {"index", "images",
        "parts"} (sampling/compiled/self_check.py); None elsewhere, before the first step, or when
        the check is off or failed.
    """

    last_model_output: torch.Tensor | None
    batch_size: int | None
    self_check_report: dict | None

    def numerics(self) -> ContextManager: ...

    def begin_batch(self, x: torch.Tensor, labels: torch.Tensor, seeds, group_ids=None,
                    trace: bool = False) -> tuple[torch.Tensor, object]: ...

    def advance(self, x: torch.Tensor, i: int, batch, noise: torch.Tensor | None = None) -> torch.Tensor: ...

    def finish_batch(self, batch) -> None: ...

    def __call__(self, x: torch.Tensor, i: int, labels, noise=None, group_ids=None, seeds=None) -> torch.Tensor: ...


def check_triton_runs_on(device) -> None:
    """Raise the one-line IGDSInputError TRITON_ON_CPU_MESSAGE when the Triton kernels cannot run on `device`.

    CUDA: they compile. Elsewhere: only interpreted. Importing igds_fast.kernels selects the
    interpreter on a machine without CUDA if triton is not imported yet (torch imports it on its own
    through torch._dynamo, e.g. in nn.init), so calling this early, before models are built, both
    makes the kernels usable and detects when that is too late. Cheap after the first call.
    """
    if torch.device(device).type == "cuda":
        return
    from ..kernels import ddpm_update

    interpreted = type(ddpm_update._ddpm_update_kernel).__name__ == "InterpretedFunction"
    if os.environ.get("TRITON_INTERPRET") != "1" or not interpreted:
        raise IGDSInputError(TRITON_ON_CPU_MESSAGE)


def resolve_noise_source(name: str):
    """(noise(seeds [B], stream, shape, device) -> [B, *shape] standard normal, keys(seeds) -> seeds).

    "torch": torch generators seeded per (image seed, stream) — the eager default; its keys are the
        Python ints themselves.
    "philox": the counter-based Philox stream the fused Triton update draws in-kernel, so the eager
        path can be given exactly the noise of the fused path; its keys are an int64 device tensor,
        built once per batch.
    """
    if name == "torch":
        return seeded_normal, lambda seeds, device: seeds
    if name == "philox":
        from ..kernels import philox_normal, seeds_to_tensor

        def checked_philox_normal(seeds, stream, shape, device, *args, **kwargs):
            check_triton_runs_on(device)  # else a CPU without the interpreter fails deep inside triton
            return philox_normal(seeds, stream, shape, device, *args, **kwargs)

        return checked_philox_normal, seeds_to_tensor
    raise IGDSInputError(f"unknown noise source {name!r}; expected one of {NOISE_SOURCES}")


def check_backend(backend: str) -> None:
    """Raise the one-line IGDSInputError of a backend name that is not one of BACKENDS."""
    if backend not in BACKENDS:
        raise IGDSInputError(f"unknown backend {backend!r}; available: {BACKENDS}")


def default_noise(backend: str, noise: str | None) -> str:
    """The noise source of a backend: `noise`, or "philox" where the step draws it in-kernel, else "torch".

    The fused and compiled steps draw their noise in the fused update kernel (Philox), so no other
    source can be given to them.
    """
    check_backend(backend)
    in_kernel = backend in IN_KERNEL_NOISE_BACKENDS
    if noise is None:
        return "philox" if in_kernel else "torch"
    if in_kernel and noise != "philox":
        raise IGDSInputError(f"noise={noise!r} cannot be used with fused kernels: they draw Philox noise in-kernel")
    return noise


def build_step(context: StepContext, backend: str, batch_invariant: bool = False, backend_options=None):
    """The stepper of a backend (the `Stepper` surface): EagerStep, FusedStep or CompiledStep."""
    check_backend(backend)
    if batch_invariant and backend != "eager":
        raise IGDSInputError("batch_invariant applies to the eager backend only")
    if backend == "compiled":
        from .compiled import CompiledStep

        return CompiledStep(context, backend_options)
    if backend_options is not None:
        raise IGDSInputError("backend_options apply to the 'compiled' backend only")
    if backend == "fused":
        check_triton_runs_on(context.device)
        from .fused import FusedStep

        return FusedStep(context)
    return EagerStep(context, batch_invariant=batch_invariant)


__all__ = ["BACKENDS", "IN_KERNEL_NOISE_BACKENDS", "NOISE_SOURCES", "Stepper", "TRITON_ON_CPU_MESSAGE", "build_step",
           "check_backend", "check_triton_runs_on", "default_noise", "resolve_noise_source"]
