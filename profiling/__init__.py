"""Profiling helpers of igds_fast (import name `igds_fast.profiling`)."""
from .nvtx import nvtx_enabled, nvtx_range

__all__ = ["nvtx_enabled", "nvtx_range"]
