"""A torch.profiler chrome trace of a few reverse steps — for machines without Nsight (CPU included).

    python profiling/torch_trace.py --preset tiny --backend compiled --out traces/tiny
    python profiling/torch_trace.py --preset adm256 --batch-size 16 --backend compiled --out traces/adm256

Builds the bench's random-weight models (the ADM presets of bench/models.py), then steps a real batch
of the sampler (`Sampler.batch`, Sampler.sample's own loop): `--warmup` steps outside the profiler
(compile, autotuning, graph capture), then `--steps` guided steps profiled, each inside its range
igds/step/<k> (k the loop step, 0 = the first from noise); the igds/unet, igds/guidance
(igds/encoder/*, igds/head), igds/update and igds/graph/* ranges of the step code appear as well
(profiling/nvtx.py emits them while a profiler records). Writes OUT/trace.json (gzipped to
trace.json.gz above 15 MiB; open in chrome://tracing or https://ui.perfetto.dev) and OUT/summary.txt
(the operator table sorted by self device time on a GPU, self CPU time otherwise).

--backend eager | fused | compiled; --compile-options takes CompileConfig fields as JSON (e.g.
'{"compile": false}' to skip torch.compile on a CPU machine, where a cold inductor compile takes minutes).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (through igds_fast)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    if REPO not in sys.path:  # the checkout's bench package (not installed with igds_fast): its models
        sys.path.insert(0, REPO)
    from bench.models import (PRESETS, STEPS_PER_IMAGE, build_prior, build_schedule, build_ve, make_sampler,
                              prior_class_map)
    from bench.timing import DEVICE, batch_jobs, synchronize
    from igds_fast.sampling import BACKENDS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--backend", choices=BACKENDS, default="compiled")
    parser.add_argument("--compile-options", default=None, help="CompileConfig fields as JSON")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default="torch_trace")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; known: {sorted(PRESETS)}")
    if args.warmup < 0 or args.steps < 1 or args.warmup + args.steps > STEPS_PER_IMAGE:
        parser.error(f"--warmup >= 0 and --steps >= 1 must fit in the schedule's {STEPS_PER_IMAGE} steps")
    options = json.loads(args.compile_options) if args.compile_options else None
    if args.backend != "compiled" and options:
        parser.error("--compile-options apply to --backend compiled")

    unet = build_prior(args.preset, DEVICE)
    ve = build_ve(args.preset, unet.image_size, DEVICE)
    schedule = build_schedule(args.preset, DEVICE)
    sampler = make_sampler(unet, schedule, ve, prior_class_map(unet), args.backend, options)
    labels, seeds = batch_jobs(args.batch_size)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if GPU:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with sampler.batch(labels, seeds) as run:
        for _ in range(args.warmup):
            run.step()
        synchronize()
        with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
            for _ in range(args.steps):
                run.step()
            synchronize()

    os.makedirs(args.out, exist_ok=True)
    trace = os.path.join(args.out, "trace.json")
    profiler.export_chrome_trace(trace)
    if os.path.getsize(trace) > 15 * 2**20:  # keep it under the device runner's 16 MiB per returned file
        with open(trace, "rb") as source, gzip.open(trace + ".gz", "wb") as target:
            shutil.copyfileobj(source, target)
        os.remove(trace)
        trace += ".gz"  # chrome://tracing and Perfetto open .json.gz as they are
    sort_by = "self_cuda_time_total" if GPU else "self_cpu_time_total"
    summary = os.path.join(args.out, "summary.txt")
    with open(summary, "w") as handle:
        handle.write(profiler.key_averages().table(sort_by=sort_by, row_limit=40) + "\n")
    print(f"wrote {trace} and {summary} ({args.preset}, {args.backend}, batch {args.batch_size}, "
          f"{args.steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
