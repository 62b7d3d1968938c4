"""NVTX ranges that cost nothing where there is no CUDA.

`torch.cuda.nvtx` raises on a machine without CUDA, so every range goes through `nvtx_range`, which
is a no-op context manager there (and when IGDS_NVTX=0).
"""
from __future__ import annotations

import contextlib
import os

import torch


def nvtx_enabled() -> bool:
    return os.environ.get("IGDS_NVTX", "1") != "0" and torch.cuda.is_available()


@contextlib.contextmanager
def nvtx_range(name: str):
    """Push an NVTX range named `name` for the duration of the block (no-op without CUDA)."""
    if not nvtx_enabled():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
