"""Bit-reproducible CPU matrix products: MKL's conditional numerical reproducibility (CNR) mode.

PyTorch's CPU GEMMs (linear layers, matmuls, im2col convolutions) run on Intel MKL. On CPUs with
AVX-512 (Intel Xeons, AMD Zen 4) MKL's default code path gives results that depend on the memory
alignment of the operands: the same product of the same values, at another address, can differ in
the last bit (measured on this project's AMD EPYC machines: 48 of 240 products of shapes the
sampler uses differed when an operand was moved by 1-15 floats). Everything igds_fast promises
byte for byte on a CPU — batch-invariant sampling, resumed folders, any world size — needs results
that do not depend on where the allocator put a tensor.

MKL fixes its code path when the environment variable MKL_CBWR is set before it initialises (at
`import torch`): "COMPATIBLE" (SSE2 kernels, the one branch MKL honours on every x86 CPU: on AMD
CPUs MKL ignores the AVX2 / AVX512 branches and falls back to AUTO, which still varies with
alignment). The CLI sets it before torch loads unless the user has set MKL_CBWR; a library user who
needs bit-identical CPU results sets `MKL_CBWR=COMPATIBLE` in the environment before starting Python
(or calls `request_reproducible_cpu_math()` before the first `import torch`).

This module imports nothing heavy: it must run before torch is imported.
"""
from __future__ import annotations

import ctypes
import os
import sys

REPRODUCIBLE_MODE = "COMPATIBLE"
# MKL's MKL_CBWR_* branch constants (mkl_cbwr.h), as mkl_cbwr_get(MKL_CBWR_BRANCH) reports them.
_BRANCH_NAMES = {
    0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
    9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1",
}
_MKL_CBWR_BRANCH = 1


def request_reproducible_cpu_math(environ=None) -> str | None:
    """Set MKL_CBWR=COMPATIBLE unless the user chose a value or torch is already imported.

    Returns the MKL_CBWR value the process will run with (None: unset, because torch was imported
    before this call and MKL has read its environment already — setting it now would only mislead).
    """
    environ = os.environ if environ is None else environ
    if "MKL_CBWR" in environ:
        return environ["MKL_CBWR"]
    if "torch" in sys.modules:
        return None
    environ["MKL_CBWR"] = REPRODUCIBLE_MODE
    return REPRODUCIBLE_MODE


def mkl_cbwr_branch() -> str | None:
    """The CNR branch MKL runs with in this process ("OFF", "AUTO", "COMPATIBLE", ...), read from MKL.

    None when torch is not built with MKL or its library does not export MKL's CNR query. Imports
    torch (call `request_reproducible_cpu_math` first).
    """
    import torch

    if not torch.backends.mkl.is_available():
        return None
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        query = getattr(ctypes.CDLL(library), "mkl_serv_cbwr_get")
    except (OSError, AttributeError):
        return None
    query.restype, query.argtypes = ctypes.c_int, [ctypes.c_int]
    branch = query(_MKL_CBWR_BRANCH)
    return _BRANCH_NAMES.get(branch, f"branch {branch}")


__all__ = ["REPRODUCIBLE_MODE", "mkl_cbwr_branch", "request_reproducible_cpu_math"]
