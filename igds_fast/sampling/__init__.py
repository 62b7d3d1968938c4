"""Sampling: the one reverse loop (`Sampler`), the one step (`reverse_step`) and its backends.

The fused-kernel and compiled backends (`sampling.fused`, `sampling.compiled`) load on demand
through `sampling.backends`, so importing this package never imports triton or the compiler.
"""
from .backends import BACKENDS, NOISE_SOURCES, Stepper, build_step, resolve_noise_source
from .eager import EagerStep, fp32_reference_math
from .sampler import Sampler, SamplingRun
from .step import NonFiniteTracker, StepContext, StepInputs, StepOps, reverse_step

__all__ = [
    "BACKENDS",
    "EagerStep",
    "NOISE_SOURCES",
    "NonFiniteTracker",
    "Sampler",
    "SamplingRun",
    "StepContext",
    "StepInputs",
    "StepOps",
    "Stepper",
    "build_step",
    "fp32_reference_math",
    "resolve_noise_source",
    "reverse_step",
]
