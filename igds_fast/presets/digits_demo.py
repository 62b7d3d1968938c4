"""`igds-fast demo digits` (also `igds-fast distill` without models): the demo command's flags and the
announcement it prints before any work (what it will do, how long it took on a 2-core CPU, where it writes).

The pipeline itself is igds_fast.presets.digits; this module only adds the command's own settings on top.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..settings import option, section
from .digits import (DEFAULT_WORK_DIR, RESULTS_NAME, SHIPPED_PRIOR, TABLE_NAME, DigitsSettings, prior_matches)


@dataclass(frozen=True, kw_only=True)
class DigitsDemo:
    """`igds-fast demo digits` (also `igds-fast distill` without models): where it caches and writes."""

    work_dir: str = option(DEFAULT_WORK_DIR, "--work-dir", metavar="DIR", help="cache of the demo's trained VE (and "
                           "prior), and its outputs without --out")
    out: str | None = option(None, "--out", metavar="DIR", default_text="--work-dir", help="where the distilled sets "
                             "(OUT/distilled/) and the results table (OUT/results.json, results.txt) go")
    force: bool = option(False, "--force", action="store_true", help="first remove what the demo wrote in --work-dir "
                         "and --out (and nothing else)")
    progress: bool = option(True, "--quiet", action="store_false", help="no progress output")
    fast: bool = option(False, "--fast", action="store_true", help="tiny settings (a smoke test; the numbers are "
                        "meaningless)")
    retrain_prior: bool = option(False, "--retrain-prior", action="store_true", help="train the prior here (about "
                                 "5 minutes) instead of using the one shipped with igds_fast")
    settings: DigitsSettings = section(DigitsSettings, "digits pipeline")


# Measured wall times of the default settings (module docstring, README): 2-core CPUs, fresh and cached.
FIRST_RUN_MINUTES = "7"
CACHED_RUN_MINUTES = "2"
FAST_RUN_MINUTES = "1"


def describe_run(settings: DigitsSettings, work_dir: str, out_dir: str | None = None, fast: bool = False,
                 retrain_prior: bool = False) -> str:
    """What the demo is about to do, how long it took on a 2-core CPU, and where it writes (printed first)."""
    out_dir = out_dir or work_dir
    sets = (len(settings.ipcs) * 2 + len(settings.selection_ipcs)) * settings.seeds
    ipcs = ", ".join(str(ipc) for ipc in settings.ipcs)
    if fast:
        duration = f"--fast: tiny settings, about {FAST_RUN_MINUTES} minute on a 2-core CPU; its numbers mean nothing"
    elif settings == DigitsSettings(device=settings.device, batch_size=settings.batch_size) and not retrain_prior:
        duration = (f"about {FIRST_RUN_MINUTES} minutes on a 2-core CPU the first time, about "
                    f"{CACHED_RUN_MINUTES} minutes once the VE and sets are cached")
    else:
        duration = (f"with the default settings it took {FIRST_RUN_MINUTES} minutes on a 2-core CPU the first "
                    "time; these settings differ")
    out = os.path.abspath(out_dir)
    if not retrain_prior and prior_matches(SHIPPED_PRIOR, settings):
        prior = "sample with the prior shipped with igds_fast (--retrain-prior trains it here) and train a VE"
    else:
        prior = f"train a small diffusion prior ({settings.prior.steps} steps) and a VE"
    lines = [
        "digits demo (no --prior/--ve given): the whole IGDS pipeline on scikit-learn's digits, on the CPU:",
        f"  {prior}, cached in {os.path.abspath(work_dir)};",
        f"  distil IPC {ipcs} unguided (DDPM) and with IGDS, and IPC "
        + f"{', '.join(str(ipc) for ipc in settings.selection_ipcs) or '-'} with IGDS + S\u00b3 (G {settings.s3_groups}, "
        + f"{settings.s3_groups} x IPC candidates per class) for {settings.seeds} seed(s): {sets} sets, "
        + f"{settings.sampling_steps} sampling steps;",
        "  train ConvNet-3 on each set and on random real subsets, then print a test-accuracy table;",
        f"  {duration};",
        f"  writes the sets to {os.path.join(out, 'distilled')}{os.sep} and the table to "
        + f"{os.path.join(out, RESULTS_NAME)} (and {TABLE_NAME}).",
        "  Your own distillation instead: igds-fast distill --prior CHECKPOINT --ve BUNDLE --ipc N --out DIR.",
    ]
    return "\n".join(lines)
