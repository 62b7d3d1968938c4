"""The compiled backend: low-precision compiled copies, the step in one CUDA graph, its self-check.

Importing the package loads only its configuration (`CompileConfig`); the step, the copies and the
memory sizing load on first use (they import the Triton kernels and with them triton).
"""
import importlib

from .config import (ATTENTION_BACKENDS, AUTOTUNE_INDUCTOR_OPTIONS, COMPILE_BACKENDS, COMPILE_MODES,
                     CONV_UNET_INDUCTOR_OPTIONS, DTYPES, CompileConfig)

# name -> the module of this package that defines it
_ON_FIRST_USE = {
    "ATTENTION_IMPLEMENTATIONS": "attention", "faster_attention": "attention", "set_attention": "attention",
    "traces_in_one_graph": "attention", "xformers_available": "attention",
    "LowPrecisionFeatures": "low_precision", "LowPrecisionUNet": "low_precision", "low_precision_copy": "low_precision",
    "CPU_BATCH_SIZE": "memory", "choose_batch_size": "memory", "compiled_batch_size": "memory",
    "estimate_step_memory": "memory", "graphs_per_batch_shape": "memory", "probe_step_bytes": "memory",
    "BatchBuffers": "buffers",
    "CompiledStep": "step",
}


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        return getattr(importlib.import_module(f"{__name__}.{_ON_FIRST_USE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ATTENTION_BACKENDS", "AUTOTUNE_INDUCTOR_OPTIONS", "COMPILE_BACKENDS", "COMPILE_MODES",
           "CONV_UNET_INDUCTOR_OPTIONS", "CompileConfig", "DTYPES", *_ON_FIRST_USE]
