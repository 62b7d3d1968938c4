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


__all__ = ["BACKENDS", "IN_KERNEL_NOISE_BACKENDS", "NOISE_SOURCES", "TRITON_ON_CPU_MESSAGE", "build_step",
           "check_backend", "check_triton_runs_on", "default_noise", "resolve_noise_source"]
