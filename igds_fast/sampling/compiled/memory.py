"""The compiled backend's batch size: given, or from free device memory (a step's per-image and fixed costs, and the fit)."""
from __future__ import annotations

from typing import Callable

import torch

from ...errors import IGDSInputError
from ...kernels._common import on_device
from ..fused import KernelOps
from .buffers import BatchBuffers, step_in_place

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
    return len({guidance.guides(i, num_steps) for i in range(num_steps)})


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


def compiled_batch_size(step) -> int:
    """Images per batch of a CompiledStep: CompileConfig.batch_size, else chosen from free device memory.

    A TensorRT UNet engine runs the one batch size it was built for; off CUDA, CPU_BATCH_SIZE.
    CUDA: one eager step of the low-precision copies is probed at two batch sizes (peak memory
    above the baseline; `estimate_step_memory` over `probe_step_bytes`); `choose_batch_size` fits the
    per-image and fixed costs into memory_fraction of the free memory (the driver's free memory plus
    what torch's caching allocator holds unused). The captured graph's pool keeps one step's
    intermediates. When the schedule has both guided and unguided steps (a guidance window), one
    batch shape captures two graphs and the second one's warm-up runs beside the first one's pool, so
    the costs are counted twice.
    """
    config = step.compile_config
    if config.batch_size is not None:
        return config.batch_size
    if config.unet_engine is not None:
        return step.unet_lp.batch_size
    if step.device.type != "cuda":
        return CPU_BATCH_SIZE
    with on_device(step.device), step.numerics():
        per_image, fixed = estimate_step_memory(lambda batch: probe_step_bytes(step, batch))
        free, _ = torch.cuda.mem_get_info(step.device)
        # Blocks torch's caching allocator holds but does not use are free for this process.
        free += torch.cuda.memory_reserved(step.device) - torch.cuda.memory_allocated(step.device)
    graphs = graphs_per_batch_shape(step.context.guidance_config, step.context.num_steps)
    return choose_batch_size(per_image * graphs, free, fixed * graphs, config.memory_fraction)


def probe_step_bytes(step, batch: int) -> int:
    """Peak bytes above the current allocation of one guided step of a CompiledStep at `batch` (CUDA).

    The step's low-precision copies run uncompiled (a compile per probed shape would cost more than
    the probe) on buffers of the probe's own, from a generator of its own (not the user's RNG).
    """
    context, device = step.context, step.device
    ops = KernelOps(context, step.tables, unet_fn=step.unet_lp, features=step.features_lp, out_in_place=True,
                    decoder=step.decoder_lp)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe = BatchBuffers(batch, context.image_shape, device, with_groups=False, conditional=context.conditional)
    probe.x.normal_(generator=torch.Generator(device=device).manual_seed(0))
    guided = [i for i in range(context.num_steps) if context.guided(i)]
    i = guided[-1] if guided else context.num_steps - 1  # a guided step where there is one: the costlier
    probe.index.fill_(i)
    step_in_place(ops, probe, i, "philox", context.guidance_config.check_finite)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


__all__ = ["CPU_BATCH_SIZE", "choose_batch_size", "compiled_batch_size", "estimate_step_memory",
           "graphs_per_batch_shape", "probe_step_bytes"]
