"""Shared helpers of the Triton kernels: scratch allocation (poisonable by tests) and seed tensors.

Nothing here reads tensor values on the host: every helper is safe inside a CUDA-graph capture
except `seeds_to_tensor` for a Python sequence (one host-to-device copy, done once per batch).
"""
from __future__ import annotations

import contextlib
import torch

from igds_fast.errors import IGDSInputError
from igds_fast.seeding import MASK64


# Test hook: when True, scratch buffers are filled with NaN instead of left uninitialised, so a
# kernel that forgets to write part of its workspace cannot pass by reading stale but correct
# values left over by the caching allocator. Tests switch it on with `poisoned_scratch()`.
_POISON_SCRATCH = False


@contextlib.contextmanager
def poisoned_scratch():
    """Within the block every kernel workspace starts as NaN (test-only; costs one fill each)."""
    global _POISON_SCRATCH
    previous, _POISON_SCRATCH = _POISON_SCRATCH, True
    try:
        yield
    finally:
        _POISON_SCRATCH = previous


def scratch(shape, device, dtype=torch.float32) -> torch.Tensor:
    """An intermediate buffer the kernels fully overwrite before reading (NaN under the test hook)."""
    if _POISON_SCRATCH:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def on_device(device):
    """Context making `device` current for a kernel launch.

    Triton launches on torch.cuda.current_device() and its current stream, not on the device of its
    tensor arguments: without this, a kernel on cuda:1 tensors while cuda:0 is current would run on
    GPU 0 with GPU 1 pointers. A no-op off CUDA.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def seeds_to_tensor(seeds, device) -> torch.Tensor:
    """Per-image seeds as an int64 device tensor [B] (the Philox key of each image).

    seeds: a sequence of Python ints (any value; taken modulo 2**64 and stored as the signed int64
    with the same 64 bits) or an integer tensor [B]. Build it once per batch, not per step: for a
    Python sequence this is one host-to-device copy.
    """
    if torch.is_tensor(seeds):
        if seeds.dim() != 1 or seeds.dtype.is_floating_point or seeds.dtype == torch.bool:
            raise IGDSInputError(f"seeds must be a 1-D integer tensor, got {seeds.dtype} {tuple(seeds.shape)}")
        return seeds.to(device=device, dtype=torch.int64)
    values = []
    for seed in seeds:
        value = int(seed) & MASK64
        values.append(value - (1 << 64) if value >= (1 << 63) else value)
    if not values:
        raise IGDSInputError("no seeds given")
    return torch.tensor(values, dtype=torch.int64, device=device)


def check_out(out: torch.Tensor | None, shape, dtype, device, name: str) -> torch.Tensor:
    """A caller-provided output buffer (shape/dtype/device checked, no value read) or a fresh one."""
    shape = tuple(int(s) for s in shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    device = torch.device(device)
    same_device = out.device.type == device.type and device.index in (None, out.device.index)
    if tuple(out.shape) != shape or out.dtype != dtype or not same_device:
        raise IGDSInputError(
            f"{name} must be a {dtype} tensor of shape {shape} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise IGDSInputError(f"{name} must be contiguous")
    return out
