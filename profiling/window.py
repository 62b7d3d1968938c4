"""The CUDA profiler window of a real run: `IGDS_PROFILE_STEPS=A:B` (or `--profile-steps A:B`).

    IGDS_PROFILE_STEPS=20:30 bash profiling/nsys.sh adm256_run -- igds-fast distill --preset adm256-cond ...

Steps are iterations of the sampling loop (`Sampler.sample`) counted from 0 in sampling order —
step 0 is the first step from noise (respaced index N-1), step N-1 the last — and the window is
half-open: A:B profiles steps A, A+1, ..., B-1 (0 <= A < B <= N; ":B" = 0:B, "A:" = A:N). It opens
once per process, in the first batch (the first `Sampler.sample` call): the CUDA profiler starts
(cudaProfilerStart, what `nsys --capture-range=cudaProfilerApi` waits for) right before step A and
stops (cudaProfilerStop) right after step B-1, so a compile, autotuning or graph capture in the
first steps stays out of the report when A is past them. Both ends synchronise the device once, so
the window holds exactly its steps' GPU work (two host syncs in the whole run, none per step).

Without CUDA (or on a CPU device) the start and stop are no-ops; the window logic runs all the same
(and its start/stop functions can be injected), so it is testable anywhere.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from igds_fast.errors import IGDSInputError

PROFILE_STEPS_ENV = "IGDS_PROFILE_STEPS"
SYNTAX = "A:B (sampling-loop steps counted from 0, B excluded, e.g. 20:30)"


@dataclass(frozen=True)
class StepWindow:
    """Loop iterations start <= k < stop (0 = the first step from noise)."""

    start: int
    stop: int

    def __str__(self) -> str:
        return f"{self.start}:{self.stop}"


def parse_step_window(spec, num_steps: int | None = None, source: str = PROFILE_STEPS_ENV) -> StepWindow:
    """A StepWindow from "A:B" (":B" = 0:B, "A:" = A:num_steps), a (A, B) pair or a StepWindow.

    num_steps: the sampling loop's length; with it, B must not exceed it (and "A:" needs it).
    source: what the message names (the env var or the CLI flag). One-line IGDSInputError on bad input.
    """
    if isinstance(spec, StepWindow):
        start, stop = spec.start, spec.stop
    elif isinstance(spec, (tuple, list)):
        if len(spec) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
            raise IGDSInputError(f"{source} must be {SYNTAX}, got {spec!r}")
        start, stop = spec
    elif isinstance(spec, str):
        text = spec.strip()
        parts = text.split(":")
        if len(parts) != 2 or not all(part.strip().isdigit() or not part.strip() for part in parts) \
                or not any(part.strip() for part in parts):
            raise IGDSInputError(f"{source} must be {SYNTAX}, got {spec!r}")
        first, last = (part.strip() for part in parts)
        start = int(first) if first else 0
        if last:
            stop = int(last)
        elif num_steps is not None:
            stop = int(num_steps)
        else:
            raise IGDSInputError(f"{source} {spec!r} leaves B open: give A:B")
    else:
        raise IGDSInputError(f"{source} must be {SYNTAX}, got {type(spec).__name__}")
    if start < 0:
        raise IGDSInputError(f"{source} {start}:{stop} starts below step 0")
    if start >= stop:
        raise IGDSInputError(f"{source} {start}:{stop} is empty: A must be below B (B is excluded)")
    if num_steps is not None and stop > num_steps:
        raise IGDSInputError(f"{source} {start}:{stop} reaches past the {num_steps} sampling steps "
                             f"(steps 0..{num_steps - 1}: B <= {num_steps})")
    return StepWindow(int(start), int(stop))


def resolve_step_window(given, num_steps: int, source: str = PROFILE_STEPS_ENV) -> StepWindow | None:
    """The window to profile: `given` (an API/CLI value) or else $IGDS_PROFILE_STEPS; None = neither.

    Both set to different windows is refused (a stale variable in the shell must not silently win
    or lose).
    """
    env = os.environ.get(PROFILE_STEPS_ENV, "").strip()
    from_env = parse_step_window(env, num_steps) if env else None
    if given is None or (isinstance(given, str) and not given.strip()):
        return from_env
    window = parse_step_window(given, num_steps, source)
    if from_env is not None and from_env != window:
        raise IGDSInputError(f"{source} {window} and {PROFILE_STEPS_ENV}={env} disagree: give one of them")
    return window


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def profiler_start(device) -> None:
    """cudaProfilerStart after the device's queued work (a no-op without CUDA)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.profiler.start()


def profiler_stop(device) -> None:
    """cudaProfilerStop once the window's work has run (a no-op without CUDA)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.profiler.stop()


_process_window_used = False  # one window per process: nsys --capture-range-end=stop records one range


def claim_process_window() -> bool:
    """True the first time in this process (the first batch), False after."""
    global _process_window_used
    if _process_window_used:
        return False
    _process_window_used = True
    return True


def reset_process_window() -> None:
    """Let the next batch open a window again (tests; a second capture in one process)."""
    global _process_window_used
    _process_window_used = False


class ProfilerWindow:
    """Opens the profiler before step `window.start` and closes it after step `window.stop - 1` of one loop.

    start / stop: called with the device (None = `profiler_start` / `profiler_stop`, looked up when
    called). `close()` stops an open window early (an exception inside the loop); idempotent.
    """

    def __init__(self, window: StepWindow, device, start: Callable | None = None, stop: Callable | None = None):
        self.window, self.device = window, device
        self._start, self._stop = start, stop
        self.is_open = False
        self.closed = False

    def before_step(self, k: int) -> None:
        if k == self.window.start and not self.is_open and not self.closed:
            (self._start or profiler_start)(self.device)
            self.is_open = True

    def after_step(self, k: int) -> None:
        if k == self.window.stop - 1:
            self.close()

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            (self._stop or profiler_stop)(self.device)
        self.closed = True


__all__ = ["PROFILE_STEPS_ENV", "ProfilerWindow", "StepWindow", "claim_process_window", "parse_step_window",
           "profiler_start", "profiler_stop", "reset_process_window", "resolve_step_window"]
