"""The CPU thread-count policy of the training and scoring loops (one place for all of them).

On 2 shared cores a second OpenMP thread makes small models 3-20x slower (barriers stall on the busy
core), so small work runs on one thread; large work keeps the process setting.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import IGDSInputError

# batch x pixels x channels of one step below which one thread is faster on these CPUs
SMALL_WORK_LIMIT = 1 << 23


def cpu_threads(device, requested: int | None, work: int) -> int:
    """The intra-op thread count for a loop: `requested`, else 1 when `work` <= SMALL_WORK_LIMIT,
    else the process's current count. Off the CPU: the current count (it is not used)."""
    current = torch.get_num_threads()
    if torch.device(device).type != "cpu":
        return current
    if requested is not None:
        return requested
    return 1 if work <= SMALL_WORK_LIMIT else current


def pinned_threads(requested: int | None, device: torch.device) -> int | None:
    """The intra-op thread count a command that promises byte-identical CPU outputs is pinned to:
    `requested` (--cpu-threads), default 1, on a CPU; None elsewhere (a request there is refused).

    Pinned, not inherited: torchrun sets OMP_NUM_THREADS=1 only for more than one rank, and a CPU
    run's bytes depend on the thread count, so without a fixed count 1 and N ranks would differ.
    """
    if torch.device(device).type != "cpu":
        if requested is not None:
            raise IGDSInputError(f"--cpu-threads applies to CPU runs only; this one runs on {device}")
        return None
    return 1 if requested is None else requested


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's intra-op threads set to `count` for the block (None: unchanged), restored afterwards;
    yields the count in force."""
    previous = torch.get_num_threads()
    if count is not None and count != previous:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


__all__ = ["SMALL_WORK_LIMIT", "cpu_threads", "pinned_threads", "torch_threads"]
