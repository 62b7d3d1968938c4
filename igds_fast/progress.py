"""Progress reporting for long runs: a one-line bar with rate and ETA on a terminal, log lines elsewhere.

    progress = Progress(total=400, unit="img", label="distill")
    progress.set_partial(12.8)     # optional: work in flight (e.g. 40% of a 32-image batch's steps)
    progress.set_partial(0)
    progress.update(32)            # after each finished batch
    log_line("compiled backend: ...")  # any time: a one-off line, never on the bar's line (log_line)
    progress.close()

On a TTY the bar redraws in place (carriage return) at most every `min_interval_s`. When the stream
is not a TTY (a log file, CI, a pipe) every update that is at least `log_interval_s` after the last
line (and the first and last updates) prints one plain line: no control characters end up in logs.
The rate counts only work done in this run (a resumed run starts with `initial` done items that do
not inflate images/s), including the fraction of unfinished items in flight (`set_partial`), so the
rate and ETA are known before the first item finishes. `close` does not repeat a line already shown.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m` (coarse on purpose: an ETA is an estimate)."""
    if seconds != seconds or seconds == float("inf"):  # NaN or unknown
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def log_line(message: str, stream: TextIO | None = None) -> None:
    """One line on `stream` (stderr): a long run's one-off messages (what it compiles, how long).

    On a TTY the line first clears the one a progress bar is being redrawn on ("\\r", erase to the
    end): the bar's next update draws it again below the message, so the two never share a line.
    """
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    stream.write(("\r\x1b[K" if isatty and isatty() else "") + message + "\n")
    stream.flush()


class Progress:
    """Counts finished items out of `total` and reports rate (items/s in this run) and ETA."""

    def __init__(
        self,
        total: int,
        unit: str = "img",
        label: str = "",
        stream: TextIO | None = None,
        initial: int = 0,
        width: int = 30,
        min_interval_s: float = 0.2,
        log_interval_s: float = 10.0,
        enabled: bool = True,
        clock=time.perf_counter,
        show_elapsed: bool = False,
    ):
        self.show_elapsed = show_elapsed
        self.total = max(0, int(total))
        self.unit = unit
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.done = int(initial)
        self.initial = int(initial)
        self.width = width
        self.min_interval_s = min_interval_s
        self.log_interval_s = log_interval_s
        self.enabled = enabled
        self.clock = clock
        self.started = clock()
        self.partial = 0.0  # unfinished items' finished fraction, in items (set_partial)
        self._last_draw = None
        self._last_shown: tuple | None = None
        isatty = getattr(self.stream, "isatty", None)
        self.is_tty = bool(isatty and isatty())
        self._closed = False

    # ---- numbers ------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    @property
    def progressed(self) -> float:
        """Finished items plus the partial amount in flight (never past the total)."""
        return min(self.done + self.partial, float(max(self.total, self.done)))

    @property
    def rate(self) -> float:
        """Items per second done in this run, in-flight fractions included (0 before any)."""
        elapsed = self.elapsed
        done_here = self.progressed - self.initial
        return done_here / elapsed if elapsed > 0 and done_here > 0 else 0.0

    @property
    def eta(self) -> float:
        """Seconds left at the current rate (inf while unknown)."""
        rate = self.rate
        remaining = max(0.0, self.total - self.progressed)
        if remaining == 0:
            return 0.0
        return remaining / rate if rate > 0 else float("inf")

    def describe(self) -> str:
        """`label 120/400 img (30%) 2.41 img/s ETA 1m56s` (`120.4/400` while a part is in flight)."""
        progressed = self.progressed
        percent = 100.0 * progressed / self.total if self.total else 100.0
        prefix = f"{self.label} " if self.label else ""
        count = f"{progressed:.1f}" if self.partial else f"{self.done}"
        elapsed = f"elapsed {format_duration(self.elapsed)} " if self.show_elapsed else ""
        return (
            f"{prefix}{count}/{self.total} {self.unit} ({percent:.0f}%) "
            f"{self.rate:.2f} {self.unit}/s {elapsed}ETA {format_duration(self.eta)}"
        )

    def bar(self) -> str:
        filled = min(self.width, int(self.width * self.progressed / self.total)) if self.total else self.width
        return "[" + "#" * filled + "." * (self.width - filled) + "]"

    # ---- output -------------------------------------------------------------------------------
    def update(self, count: int = 1) -> None:
        """Record `count` more finished items and report if it is time to (the partial amount stays)."""
        self.done += int(count)
        self._report(final=self.done >= self.total)

    def set_partial(self, items: float) -> None:
        """Set the amount of unfinished items already done (e.g. 0.4 x a batch 40% through its steps)."""
        self.partial = max(0.0, min(float(items), float(max(0, self.total - self.done))))
        self._report(final=False)

    def _report(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        interval = self.min_interval_s if self.is_tty else self.log_interval_s
        if not final and self._last_draw is not None and now - self._last_draw < interval:
            return
        state = (self.done, self.partial)
        if final and state == self._last_shown:
            return  # the final state is on screen already (update reached the total, then close)
        self._last_draw = now
        self._last_shown = state
        if self.is_tty:
            self.stream.write("\r" + self.bar() + " " + self.describe() + "\x1b[K")
        else:
            self.stream.write(self.describe() + "\n")
        self.stream.flush()

    def start(self) -> None:
        """Report the starting point (useful for resumed runs: shows what is already done)."""
        self._report(final=False)

    def close(self) -> None:
        """Finish the bar's line on a TTY (the last state is always reported)."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        self._last_draw = None
        self._report(final=True)
        if self.is_tty:
            self.stream.write("\n")
            self.stream.flush()
