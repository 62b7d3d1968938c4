"""A torch.profiler chrome trace of a few reverse steps — for machines without Nsight (CPU included).

    python profiling/torch_trace.py --preset tiny --backend compiled --out traces/tiny
    python profiling/torch_trace.py --preset adm256 --batch-size 16 --backend compiled --out traces/adm256

Builds the bench's random-weight models (bench/sampler.py presets), runs `--warmup` steps outside
the profiler (compile, autotuning, graph capture), then profiles `--steps` guided steps, each inside a
record_function range igds/step/<k> (k the loop step, 0 = the first from noise, as in Sampler.sample); the igds/unet, igds/guidance (igds/encoder/*, igds/head), igds/update and igds/graph/*
ranges of the step code appear as well (profiling/nvtx.py emits them while a profiler records).
Writes OUT/trace.json (gzipped to trace.json.gz above 15 MiB; open in chrome://tracing or https://ui.perfetto.dev) and OUT/summary.txt (the
operator table sorted by self device time on a GPU, self CPU time otherwise).

--backend eager | compiled; --compile-options takes CompileConfig fields as JSON (e.g. '{"compile":
false}' to skip torch.compile on a CPU machine, where a cold inductor compile takes minutes).
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import sys

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (through igds_fast)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    """bench/sampler.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("igds_bench_sampler", os.path.join(REPO, "bench", "sampler.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--backend", choices=("eager", "compiled"), default="compiled")
    parser.add_argument("--compile-options", default=None, help="CompileConfig fields as JSON")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default="torch_trace")
    args = parser.parse_args(argv)

    bench = load_bench()
    if args.preset not in bench.PRESETS:
        parser.error(f"unknown preset {args.preset!r}; known: {sorted(bench.PRESETS)}")
    from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
    from igds_fast.models.adm import ADM_DIFFUSION_FLAGS

    device = bench.DEVICE
    unet = bench.build_prior(args.preset, device)
    ve = bench.build_ve(args.preset, unet.image_size, device)
    schedule = DiffusionSchedule(
        ScheduleConfig(**ADM_DIFFUSION_FLAGS[bench.PRESETS[args.preset][1]], sampling_steps="250"), device=device
    )
    class_map = list(range(0, 1000, 1000 // bench.VE_CLASSES))[: bench.VE_CLASSES] if unet.num_classes else None
    options = json.loads(args.compile_options) if args.compile_options else None
    if args.backend == "eager" and options:
        parser.error("--compile-options apply to --backend compiled")
    sampler = bench.make_sampler(unet, schedule, ve, class_map, args.backend, options)

    batch = args.batch_size
    labels = (torch.arange(batch, device=device) % bench.VE_CLASSES).long()
    seeds = list(range(batch))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if GPU:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # Sampler.sample's own loop, stepped here: each step in its igds/step/<k> range (k = the loop step,
    # 0 = the first from noise), which nvtx_range records while the profiler runs.
    with sampler.batch(labels, seeds) as run:
        for _ in range(args.warmup):
            run.step()
        bench.synchronize()
        with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
            for _ in range(args.steps):
                run.step()
            bench.synchronize()

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
    print(f"wrote {trace} and {summary} ({args.preset}, {args.backend}, batch {batch}, {args.steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
