"""The child side of the memory benches (bench/data.py, probe_memory.py, rehearsal.py): each runs one
igds-fast command per process (`python bench/<script>.py --child ARGV...`) so that ru_maxrss is that
command's own peak, and reads back the one JSON line this prints."""
from __future__ import annotations

import json
import resource
import time


def child(argv: list[str]) -> None:
    """Run one CLI command in this process; print its exit code, wall time, peak RSS and its largest
    child's (a DataLoader worker's) peak RSS, MiB, as one "BENCH {json}" line."""
    from igds_fast.cli import main

    started = time.perf_counter()
    code = main(argv)
    print("BENCH " + json.dumps({
        "code": code, "seconds": time.perf_counter() - started,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB -> MiB (Linux)
        "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))
