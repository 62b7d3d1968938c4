"""The compiled backend: low-precision compiled copies, the step in one CUDA graph, its self-check."""
from .attention import ATTENTION_IMPLEMENTATIONS, faster_attention, set_attention, traces_in_one_graph, xformers_available
from .config import ATTENTION_BACKENDS, COMPILE_BACKENDS, COMPILE_MODES, CONV_UNET_INDUCTOR_OPTIONS, DTYPES, CompileConfig
from .low_precision import LowPrecisionFeatures, LowPrecisionUNet, low_precision_copy
from .memory import CPU_BATCH_SIZE, choose_batch_size, estimate_step_memory, graphs_per_batch_shape
from .step import CompiledStep

__all__ = [
    "ATTENTION_BACKENDS",
    "ATTENTION_IMPLEMENTATIONS",
    "COMPILE_BACKENDS",
    "COMPILE_MODES",
    "CONV_UNET_INDUCTOR_OPTIONS",
    "CPU_BATCH_SIZE",
    "CompileConfig",
    "CompiledStep",
    "DTYPES",
    "LowPrecisionFeatures",
    "LowPrecisionUNet",
    "choose_batch_size",
    "estimate_step_memory",
    "faster_attention",
    "graphs_per_batch_shape",
    "low_precision_copy",
    "set_attention",
    "traces_in_one_graph",
    "xformers_available",
]
