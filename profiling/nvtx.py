"""NVTX ranges that cost nothing where there is no CUDA, and that torch.profiler sees too.

`torch.cuda.nvtx` raises on a machine without CUDA, so every range goes through `nvtx_range`, which
pushes an NVTX range only where CUDA is available (and IGDS_NVTX is not "0"), and a
`torch.profiler.record_function` range only while a torch profiler is recording (so a chrome trace
from profiling/torch_trace.py shows the same igds/... phases on any machine, CPU included). With
neither active it is a no-op context manager.
"""
from __future__ import annotations

import contextlib
import os

import torch


def nvtx_enabled() -> bool:
    return os.environ.get("IGDS_NVTX", "1") != "0" and torch.cuda.is_available()


@contextlib.contextmanager
def nvtx_range(name: str):
    """Push an NVTX range (and a torch.profiler range while profiling) named `name` for the block."""
    nvtx = nvtx_enabled()
    profiler = torch.autograd._profiler_enabled()
    if not (nvtx or profiler):
        yield
        return
    with contextlib.ExitStack() as stack:
        if profiler:
            stack.enter_context(torch.profiler.record_function(name))
        if nvtx:
            torch.cuda.nvtx.range_push(name)
            stack.callback(torch.cuda.nvtx.range_pop)
        yield
