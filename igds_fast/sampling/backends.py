"""The one place that maps a backend name (and a noise source name) to what implements it.

Imports are lazy here, and only here in the sampling layer: the Triton kernels (and with them
triton) load only for a backend or noise source that uses them, the compile machinery only for
the compiled backend.
"""
from __future__ import annotations

from ..errors import IGDSInputError
from ..seeding import seeded_normal
from .eager import EagerStep
from .step import StepContext

BACKENDS = ("eager", "compiled")
NOISE_SOURCES = ("torch", "philox")


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

        return philox_normal, seeds_to_tensor
    raise IGDSInputError(f"unknown noise source {name!r}; expected one of {NOISE_SOURCES}")


def build_step(context: StepContext, backend: str, use_kernels: bool = False, batch_invariant: bool = False,
               backend_options=None):
    """The step object of a backend: EagerStep, FusedStep (use_kernels) or CompiledStep."""
    if backend not in BACKENDS:
        raise IGDSInputError(f"unknown backend {backend!r}; available: {BACKENDS}")
    if batch_invariant and (backend != "eager" or use_kernels):
        raise IGDSInputError("batch_invariant applies to the eager backend without kernels only")
    if backend == "compiled":
        from .compiled import CompiledStep

        return CompiledStep(context, backend_options)
    if backend_options is not None:
        raise IGDSInputError("backend_options apply to the 'compiled' backend only")
    if use_kernels:
        from .fused import FusedStep

        return FusedStep(context)
    return EagerStep(context, batch_invariant=batch_invariant)


__all__ = ["BACKENDS", "NOISE_SOURCES", "build_step", "resolve_noise_source"]
