"""Batch size from free device memory: the per-image and fixed costs of a step, and the fit."""
from __future__ import annotations

from typing import Callable

import torch

from ...errors import IGDSInputError

CPU_BATCH_SIZE = 8  # on CPU the batch is bounded by time, never by memory


def choose_batch_size(
    per_image_bytes: int,
    free_bytes: int,
    fixed_bytes: int = 0,
    fraction: float = 0.8,
    max_batch: int = 256,
    multiple: int = 8,
) -> int:
    """The largest batch whose step fits in `fraction` of the free memory.

    per_image_bytes: peak memory one more image adds to a step; fixed_bytes: the batch-independent
    part (workspaces, scratch). The result is capped at max_batch and, when >= multiple, rounded down
    to a multiple of `multiple` (tensor-core friendly GEMM M dimensions in the guidance head / attention).
    Raises IGDSInputError when not even one image fits.
    """
    if per_image_bytes <= 0:
        raise IGDSInputError(f"per_image_bytes must be positive, got {per_image_bytes}")
    budget = free_bytes * fraction - fixed_bytes
    batch = int(budget // per_image_bytes)
    if batch < 1:
        raise IGDSInputError(
            f"not enough free memory for one image: a step needs {per_image_bytes / 2**30:.2f} GiB per image "
            f"+ {fixed_bytes / 2**30:.2f} GiB, {free_bytes / 2**30:.2f} GiB free (x{fraction} usable)"
        )
    batch = min(batch, max_batch)
    if batch >= multiple:
        batch -= batch % multiple
    return batch


def graphs_per_batch_shape(guidance, num_steps: int) -> int:
    """How many step graphs one batch shape captures: 2 when some steps are guided and some not."""
    return len({guidance.guides_step(step) for step in range(num_steps)})


def estimate_step_memory(probe_bytes: Callable[[int], int], sizes: tuple[int, int] = (2, 4)) -> tuple[int, int]:
    """(per-image bytes, fixed bytes) of one step, from `probe_bytes(batch)` peaks at two batch sizes.

    Each size is probed twice and the second reading kept: the first run of a shape allocates
    one-time state (cuBLAS/cuDNN workspaces, cudnn.benchmark trials) that would otherwise land in one
    reading and not the other. A difference that is not positive (allocator noise) falls back to
    counting the whole larger peak as per-image cost, which over-estimates and so stays safe. A
    probe that runs out of memory at the larger sizes retries at (1, 2).
    """
    small, large = sizes
    try:
        readings = {}
        for batch in (small, large):
            probe_bytes(batch)
            readings[batch] = probe_bytes(batch)
    except torch.cuda.OutOfMemoryError:
        if sizes == (1, 2):
            raise IGDSInputError("not enough free GPU memory for a step at batch 1") from None
        torch.cuda.empty_cache()
        return estimate_step_memory(probe_bytes, (1, 2))
    low, high = readings[small], readings[large]
    per_image = -(-(high - low) // (large - small))  # ceil
    if per_image <= 0:
        return -(-high // large), 0
    return per_image, max(low - small * per_image, 0)


__all__ = ["CPU_BATCH_SIZE", "choose_batch_size", "estimate_step_memory", "graphs_per_batch_shape"]
