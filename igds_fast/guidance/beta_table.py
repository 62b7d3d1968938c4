"""The beta table: IGDS's contextual weight beta per IPC, its file format and the lookup by IPC.

beta (GuidanceConfig.beta) weighs the contextual term KL(P || Q_y) against log p(y|x), and the
right weight grows with IPC (IGDS_SPEC section 6). `igds-fast calibrate-beta` measures it on real
data and writes the table with `write_beta_table`; `igds-fast distill --beta-table FILE` reads it
with `read_beta_table` and takes the run's IPC with `beta_for_ipc`. File format (JSON):

    {"beta_per_ipc": {"1": 0.0, "10": 0.1, ...}, "table": [rows of the calibration], "settings": {...}}
"""
from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Callable, Mapping

from ..errors import IGDSInputError
from ..limits import read_json

# Placeholder beta per IPC (IGDS_SPEC section 6): the paper's calibrated values did not survive
# text extraction; it only states that beta is small at IPC 1 and grows with IPC. These numbers
# follow that shape and nothing more -- calibrate them for a real data set with
# `igds-fast calibrate-beta` and pass `--beta-table beta.json`.
DEFAULT_BETA_TABLE: dict[int, float] = {1: 0.0, 10: 0.1, 20: 0.2, 50: 0.5, 100: 1.0}
DEFAULT_TABLE_SOURCE = "default table (placeholder, uncalibrated)"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_beta_table(path: str | os.PathLike, result: Mapping) -> None:
    """Write {"beta_per_ipc": {"1": beta, ...}, "table": [...], "settings": {...}} atomically (JSON).

    `result` is what `calibrate_beta` returns (the chosen betas, table rows and settings; the
    subset indices are not written). The distill command reads it back with `read_beta_table`.
    """
    from ..imageio import write_json_atomic

    if not isinstance(result, Mapping) or "chosen" not in result:
        raise IGDSInputError("write_beta_table needs the dict calibrate_beta returns (with 'chosen')")
    chosen = result["chosen"]
    checked = _check_beta_map({str(k): v for k, v in chosen.items()}, "result['chosen']")
    document = {
        "beta_per_ipc": {str(ipc): beta for ipc, beta in sorted(checked.items())},
        "table": list(result.get("table", [])),
        "settings": dict(result.get("settings", {})),
    }
    write_json_atomic(path, document)


def _check_beta_map(mapping, source: str) -> dict[int, float]:
    if not isinstance(mapping, Mapping) or not mapping:
        raise IGDSInputError(f"{source}: beta_per_ipc must be a non-empty mapping of IPC -> beta")
    table = {}
    for key, value in mapping.items():
        try:
            ipc = int(str(key))
        except ValueError:
            raise IGDSInputError(f"{source}: IPC key {key!r} is not an integer") from None
        if ipc < 1 or str(ipc) != str(key).strip():
            raise IGDSInputError(f"{source}: IPC key {key!r} is not a positive integer")
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise IGDSInputError(f"{source}: beta for IPC {ipc} must be a finite number >= 0, got {value!r}")
        table[ipc] = float(value)
    return table


def read_beta_table(path: str | os.PathLike) -> dict[int, float]:
    """{ipc: beta} from a file written by `write_beta_table`; any defect is a one-line IGDSInputError."""
    path = os.fspath(path)
    document = read_json(path, "beta table")
    if not isinstance(document, dict) or "beta_per_ipc" not in document:
        raise IGDSInputError(f"{path} is not a beta table (no 'beta_per_ipc')")
    return _check_beta_map(document["beta_per_ipc"], path)


def beta_for_ipc(table: Mapping[int, float], ipc: int, log: Callable[[str], None] | None = _stderr) -> float:
    """beta for `ipc`: the exact entry, else the nearest smaller IPC's (with a note to `log`).

    An IPC smaller than every entry raises a one-line IGDSInputError (betas grow with IPC, so a
    larger IPC's beta would overweight the contextual term).
    """
    if not isinstance(ipc, numbers.Integral) or isinstance(ipc, bool) or ipc < 1:
        raise IGDSInputError(f"IPC must be a positive integer, got {ipc!r}")
    if not table:
        raise IGDSInputError("the beta table is empty")
    if ipc in table:
        return float(table[ipc])
    smaller = [k for k in table if k < ipc]
    if not smaller:
        raise IGDSInputError(
            f"the beta table has no entry for IPC {ipc} nor for any smaller IPC (it covers {sorted(table)})"
        )
    nearest = max(smaller)
    if log is not None:
        log(f"note: the beta table has no IPC {ipc}; using beta {table[nearest]:g} of IPC {nearest} (nearest smaller)")
    return float(table[nearest])


def resolve_beta(beta: float | None, table_path: str | None, ipc: int) -> tuple[float, str]:
    """(beta, where it came from) of a run at `ipc`: `beta` when given, else the table file at `ipc`,
    else DEFAULT_BETA_TABLE at `ipc`. Both given is refused in one line."""
    if beta is not None:
        if table_path is not None:
            raise IGDSInputError("give --beta or --beta-table, not both")
        return float(beta), "given"
    if table_path is not None:
        return beta_for_ipc(read_beta_table(table_path), ipc), f"table {os.path.abspath(table_path)}"
    return beta_for_ipc(DEFAULT_BETA_TABLE, ipc, log=None), DEFAULT_TABLE_SOURCE


__all__ = ["DEFAULT_BETA_TABLE", "beta_for_ipc", "read_beta_table", "resolve_beta", "write_beta_table"]
