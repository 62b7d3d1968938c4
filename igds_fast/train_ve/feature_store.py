"""The frozen encoder's features of the whole training set, written once and read back chunk by chunk.

The linear probe is trained full batch (every objective evaluation sums over all N images), and the
report's training statistics need every image's features after the probe and the centroids are
known: the features are computed once and read again many times. `FeatureRows` holds them

* in a file (`path` given: the CLI's `OUT.checkpoint.features`, beside the bundle): float32 rows
  [N, d], row-major, appended in order, read back with plain reads into one chunk-sized buffer at a
  time. Peak memory does not grow with N: page-cache pages are not the process's (a memory map would
  be: every page it touches counts in its resident set until unmapped). Disk: 4 * N * d bytes
  (ImageNet-1K's 1.28 M images at d = 2048: 10.5 GB; removed once the report is made).
* in memory (no path: the Python API without a checkpoint), one [N, d] float32 tensor.

float32, not float16: the probe, the centroids and the report then see exactly the features a
full-batch run saw (fp16 would halve the disk and the reads but round every feature to 11 bits and
overflow above 65504).

`FeatureMoments`: the per-coordinate mean and (population) standard deviation of the rows, merged
batch by batch in float64 (Chan et al.'s pairwise update), for the probe's standardisation.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from ..errors import IGDSDiskFullError, IGDSInputError
from ..imageio import DISK_FULL_ERRNOS

CHUNK_BYTES = 32 << 20  # one chunk of rows read back: 4,096 rows at d = 2048


def chunk_rows(dim: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk read back: chunk_bytes of float32 rows, at least 256."""
    return max(256, chunk_bytes // (4 * dim))


class FeatureRows:
    """[count, dim] float32 rows appended in order (`append`), then read in chunks (`chunks`).

    path: the file (flat memory), or None (one in-memory tensor). rows_done: how many rows an
    earlier, interrupted pass left in the file (it is cut to that length; the rest is written again).
    """

    def __init__(self, count: int, dim: int, path: str | None = None, rows_done: int = 0):
        self.count, self.dim, self.path = int(count), int(dim), path
        self.rows = int(rows_done)
        self._tensor = None
        self._handle = None
        if path is None:
            if rows_done:
                raise IGDSInputError("in-memory features cannot resume")
            self._tensor = torch.empty(self.count, self.dim, dtype=torch.float32)
            return
        if rows_done and (not os.path.isfile(path) or os.path.getsize(path) < self.rows * self.dim * 4):
            raise IGDSInputError(f"{path} holds fewer than the {self.rows} feature rows its stage file counts; "
                                 "delete it and its .classifier file to start the classifier stage afresh")
        mode = "r+b" if rows_done else "w+b"
        try:
            self._handle = open(path, mode)
            self._handle.truncate(self.rows * self.dim * 4)
            self._handle.seek(self.rows * self.dim * 4)
        except OSError as exc:
            self._close_quietly()
            self._raise_disk(exc)

    def _raise_disk(self, exc: OSError):
        if exc.errno in DISK_FULL_ERRNOS:
            raise IGDSDiskFullError(os.path.dirname(os.path.abspath(self.path))) from exc
        raise exc

    def _close_quietly(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:
                pass
            self._handle = None

    @property
    def complete(self) -> bool:
        return self.rows == self.count

    def append(self, features: torch.Tensor) -> None:
        """Write the next rows: features [B, dim] (any float dtype and device; stored as float32)."""
        rows = features.detach().to("cpu", torch.float32).contiguous()
        if rows.dim() != 2 or rows.shape[1] != self.dim or self.rows + rows.shape[0] > self.count:
            raise IGDSInputError(f"feature rows {tuple(rows.shape)} do not fit [{self.count}, {self.dim}] at row {self.rows}")
        if self._tensor is not None:
            self._tensor[self.rows : self.rows + rows.shape[0]] = rows
        else:
            try:
                self._handle.write(rows.numpy().tobytes())
            except OSError as exc:
                self._raise_disk(exc)
        self.rows += rows.shape[0]

    def flush(self) -> None:
        """Everything appended so far on disk (before a state that counts these rows is saved)."""
        if self._handle is not None:
            try:
                self._handle.flush()
                os.fsync(self._handle.fileno())
            except OSError as exc:
                self._raise_disk(exc)

    def chunks(self, device, rows_per_chunk: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, features [b, dim] float32 on `device`) for consecutive chunks of all written rows."""
        step = rows_per_chunk or chunk_rows(self.dim)
        device = torch.device(device)
        for start in range(0, self.rows, step):
            stop = min(start + step, self.rows)
            if self._tensor is not None:
                block = self._tensor[start:stop]
            else:
                buffer = np.empty((stop - start, self.dim), dtype=np.float32)
                self._handle.seek(start * self.dim * 4)
                read = self._handle.readinto(memoryview(buffer).cast("B"))
                if read != buffer.nbytes:
                    raise IGDSInputError(f"{self.path}: the feature file ends early (row {start}); delete it to start afresh")
                block = torch.from_numpy(buffer)
            yield slice(start, stop), block.to(device, non_blocking=False)

    def close(self) -> None:
        """Release the file (kept on disk) or the tensor."""
        self._close_quietly()
        self._tensor = None


class FeatureMoments:
    """Per-coordinate mean and population std of rows added batch by batch (float64, pairwise merge).

    For a batch of n rows with mean m_b and sum of squared deviations S_b, merged into (N, m, S):
        delta = m_b - m;  m <- m + delta * n / (N + n);  S <- S + S_b + delta^2 * N n / (N + n)
    std = sqrt(S / N). state() / from_state() carry it across an interruption (exact).
    """

    def __init__(self, dim: int):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.squares = torch.zeros(dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        rows = features.detach().to(torch.float64)
        n = rows.shape[0]
        if n == 0:
            return
        self.mean, self.squares = self.mean.to(rows.device), self.squares.to(rows.device)
        batch_mean = rows.mean(dim=0)
        batch_squares = (rows - batch_mean).square().sum(dim=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.squares = self.squares + batch_squares + delta.square() * (self.count * n / total)
        self.count = total

    def std(self) -> torch.Tensor:
        return (self.squares / max(self.count, 1)).sqrt()

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.cpu(), "squares": self.squares.cpu(), "count": torch.tensor(self.count)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "FeatureMoments":
        moments = cls(state["mean"].shape[0])
        moments.mean, moments.squares = state["mean"].clone(), state["squares"].clone()
        moments.count = int(state["count"])
        return moments


__all__ = ["CHUNK_BYTES", "FeatureMoments", "FeatureRows", "chunk_rows"]
