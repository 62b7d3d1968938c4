"""Scale-out under torchrun: process groups, job sharding, rank-0-first validation, result merging.

    torchrun --nproc_per_node N [--nnodes M --node_rank R --master_addr HOST --master_port P] \\
        -m igds_fast distill ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them (a plain
`igds-fast distill`) everything here is a single-process no-op. NCCL on GPUs (each rank on
cuda:LOCAL_RANK), gloo on CPU. Every collective is bounded by the process-group timeout, so a rank
that dies makes the others fail promptly instead of hanging — except the end-of-run gather, where a
rank that finished its share (or had none) waits for the slowest rank's whole sampling: that one runs
on a gloo group of its own with a timeout of days (a dead rank is then torchrun's to detect: its
agent tears the other ranks down).

Progress under torchrun (`ProgressRounds`): one line for the whole job, printed by rank 0. Every
rank posts its count of finished images after each of its batches as a non-blocking all_reduce on a
gloo group of its own (END_TIMEOUT_S); rank 0 only polls which of them have completed, so no rank
ever waits for another in the loop. Every rank posts the same number of rounds (the largest share,
agreed before the loop; a rank with fewer batches posts its final count for the rest at the end), so
the collectives always pair up and cannot hang on a rank with one batch less.

Sharding: the pending (unfinished) jobs — a deterministic list — are dealt round-robin, so the ranks
get equal shares of the work still to do after a resume. Which rank makes an image never changes
its pixels: an image is keyed by (global seed, class, index), and the eager backend steps
batch-invariantly, so the output folder is the same whatever the world size.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .devices import resolve_device
from .errors import IGDSInputError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0
END_TIMEOUT_S = 7 * 24 * 3600.0  # the end-of-run gather: longer than any rank's share of a run


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank r of world_size (1 and 0 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    end_group: Any = field(default=None, compare=False, repr=False)  # gloo, END_TIMEOUT_S: gather_to_main
    progress_group: Any = field(default=None, compare=False, repr=False)  # gloo, END_TIMEOUT_S: ProgressRounds

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(
    device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, end_timeout_s: float = END_TIMEOUT_S
) -> DistContext:
    """Join the process group torchrun describes (env:// rendezvous); a no-op for a single process.

    device: "cuda", "cpu" or None (cuda when available). timeout_s bounds every collective but the
    end-of-run gather, which gets end_timeout_s. Returns the context; on CUDA the current device
    becomes cuda:LOCAL_RANK.
    """
    if not launched_by_torchrun():
        return DistContext()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device).type == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    # Every rank creates it at the same point (group creation is collective). Gloo also keeps the
    # object gather off the GPU whatever the main backend.
    end_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=end_timeout_s))
    # Progress rounds wait, at worst, for the slowest rank's batch (minutes): the long timeout too.
    progress_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=end_timeout_s))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend,
                       end_group=end_group, progress_group=progress_group)


def rank_device(ctx: DistContext, device: str | None) -> str:
    """The device this rank samples on: cuda:LOCAL_RANK under torchrun with CUDA, else `device`."""
    if ctx.enabled and ctx.backend == "nccl":
        return f"cuda:{ctx.local_rank}"
    return str(resolve_device(device))


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share of a deterministic list: items r, r + W, r + 2W, ... (balanced counts)."""
    return list(items[ctx.rank :: ctx.world_size])


def main_first(ctx: DistContext, validate: Callable[[], T]) -> T:
    """Run `validate` on rank 0 first; the other ranks wait, then run it themselves if it passed.

    A bad input thus fails once, on rank 0, with one message (IGDSInputError re-raised there); the
    other ranks get an IGDSInputError marked `quiet` (their CLI exits non-zero without printing).
    """
    if not ctx.enabled:
        return validate()
    error: str | None = None
    result = None
    if ctx.is_main:
        try:
            result = validate()
        except IGDSInputError as exc:
            error = str(exc)
    message = [error]
    dist.broadcast_object_list(message, src=0)
    if ctx.is_main:
        if error is not None:
            raise IGDSInputError(error)
        return result
    if message[0] is not None:
        raise QuietRankError(message[0])
    return validate()


class QuietRankError(IGDSInputError):
    """The input error rank 0 already reported: other ranks exit non-zero without repeating it."""

    quiet = True


def gather_to_main(ctx: DistContext, obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (in rank order); None on the other ranks.

    The end-of-run collective: on `ctx.end_group` (END_TIMEOUT_S), since a rank with a small share,
    or none, reaches it long before the others.
    """
    if not ctx.enabled:
        return [obj]
    gathered = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, gathered, dst=0, group=ctx.end_group)
    return gathered


def agree_min(ctx: DistContext, value: int) -> int:
    """The smallest of every rank's `value` (e.g. a batch size each rank chose from its own free memory).

    A collective: every rank must call it. Single process: `value` itself.
    """
    if not ctx.enabled:
        return value
    values = [None] * ctx.world_size
    dist.all_gather_object(values, int(value))
    return min(values)


def agree_max(ctx: DistContext, value: int) -> int:
    """The largest of every rank's `value` (a collective: every rank must call it; else `value`)."""
    if not ctx.enabled:
        return value
    values = [None] * ctx.world_size
    dist.all_gather_object(values, int(value))
    return max(values)


class ProgressRounds:
    """Every rank's count of finished items, summed for rank 0 without making any rank wait in its loop.

        rounds = ProgressRounds(ctx, agree_max(ctx, len(my_batches)))
        for batch in my_batches:
            ...; rounds.post(my_finished)          # non-blocking
            others = rounds.others()               # rank 0: the other ranks' total as last known
        rounds.finish(my_finished, on_round)       # every rank: post the remaining rounds, wait for all

    Round n is an all_reduce (sum) of each rank's count after its n-th batch, issued with
    async_op=True on `ctx.progress_group`; `others()` takes the completed rounds in order (their
    sum minus this rank's own part of it) and never blocks. Every rank must post exactly `rounds`
    times (`finish` posts the rounds a rank has left), so the collectives pair up whatever each
    rank's share. Single process: nothing is posted and `others()` is 0.
    """

    def __init__(self, ctx: DistContext, rounds: int):
        self.ctx, self.rounds = ctx, int(rounds)
        self.posted = 0
        self.known_others = 0
        self._pending: list[tuple[Any, torch.Tensor, int]] = []

    def post(self, count: int) -> None:
        """This rank's count of finished items after one more of its batches."""
        if not self.ctx.enabled:
            return
        if self.posted >= self.rounds:
            raise RuntimeError(f"ProgressRounds: more than the {self.rounds} agreed rounds posted")
        value = torch.tensor([int(count)], dtype=torch.int64)
        work = dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.ctx.progress_group, async_op=True)
        self._pending.append((work, value, int(count)))
        self.posted += 1

    def others(self) -> int:
        """The other ranks' total at the newest completed round (0 before any; non-blocking)."""
        while self._pending and self._pending[0][0].is_completed():
            self._take()
        return self.known_others

    def finish(self, count: int, on_round: Callable[[int], None] | None = None) -> int:
        """Post this rank's final `count` for its remaining rounds, then wait for every round.

        on_round(others) after each round completes (rank 0 redraws its progress line as the slower
        ranks finish). Returns the other ranks' final total.
        """
        if not self.ctx.enabled:
            return 0
        while self.posted < self.rounds:
            self.post(count)
        while self._pending:
            self._take()
            if on_round is not None:
                on_round(self.known_others)
        return self.known_others

    def _take(self) -> None:
        work, value, own = self._pending.pop(0)
        work.wait()  # returns at once for a completed round; raises if a peer failed
        self.known_others = max(self.known_others, int(value[0]) - own)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
