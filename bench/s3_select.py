"""Time S³ subgroup selection (igds_fast.select) at the issue's size: C=1000, G=20, K=10, d=2048.

    python bench/s3_select.py                         # CPU, and CUDA too when a GPU is there
    python bench/s3_select.py --device cpu --json out.json
    python bench/s3_select.py --classes 100 --groups 5 --images 10 --dim 512   # a smaller problem

The candidate features are synthetic but shaped like real ones: each class has a random unit
direction, every image is normalize(direction + spread * noise), and the real centroid of a class
is its direction plus a little noise — so the own and the pair terms disagree and the coordinate
ascent has work to do (it usually runs its full `max_passes`, the slow case). Reported per device:
the subgroup-centroid step ([C, G, K, d] -> [C, G, d], which also checks the features), the search
itself and their sum (= `s3_search`), as the median of --repeat runs (warm-up: one run on a C = 8
problem), with the MKL_CBWR branch in force on the CPU (the CLI runs with COMPATIBLE), the passes
run, the number of classes whose choice changed from the closest-to-real start, and both objective
values (the search must not end below its start; the script fails if it does).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from igds_fast.cpu_math import mkl_cbwr_branch  # noqa: E402
from igds_fast.select import (  # noqa: E402
    SEARCH_METHODS,
    S3Config,
    s3_search,
    s3_search_centroids,
    subgroup_centroids,
)


def synthetic_problem(classes, groups, images, dim, spread, seed, device, dtype):
    """Features [C, G, K, d] and real centroids [C, d], generated class-chunk by class-chunk on `device`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    directions = F.normalize(torch.randn(classes, dim, generator=generator, device=device), dim=-1)
    features = torch.empty((classes, groups, images, dim), dtype=dtype, device=device)
    for start in range(0, classes, 50):
        block = directions[start : start + 50, None, None]
        noise = torch.randn((block.shape[0], groups, images, dim), generator=generator, device=device)
        features[start : start + 50] = F.normalize(block + spread * noise / dim**0.5, dim=-1).to(dtype)
    real = F.normalize(directions + 0.5 * torch.randn(classes, dim, generator=generator, device=device) / dim**0.5,
                       dim=-1)
    return features, real


def timed(fn, device, repeat):
    """(median wall s, median process CPU s, last result) of fn() over `repeat` runs.

    The CPU seconds tell what the wall time means on a shared machine (CPU s / wall s < threads:
    the process waited for cores). Warm-up happens beforehand on a small problem.
    """
    runs = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs.append((time.perf_counter() - start, time.process_time() - start_cpu, result))
    return (statistics.median(run[0] for run in runs), statistics.median(run[1] for run in runs), runs[-1][2])


def bench_device(device, args, config):
    compute = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    kwargs = config.search_kwargs()
    # warm-up (kernel loading, allocator, cuBLAS handles) on a small problem, not timed
    small = synthetic_problem(8, args.groups, args.images, args.dim, args.spread, args.seed, device, torch.float32)
    s3_search(*small, dtype=compute, method=args.method, **kwargs)
    features, real = synthetic_problem(args.classes, args.groups, args.images, args.dim, args.spread, args.seed,
                                       device, torch.float32)
    centroid_s, centroid_cpu_s, centroids = timed(functools.partial(subgroup_centroids, features, dtype=compute), device, args.repeat)
    del features  # the search needs only the [C, G, d] centroids
    search_s, search_cpu_s, result = timed(
        lambda: s3_search_centroids(centroids, real, dtype=compute, method=args.method, **kwargs), device, args.repeat
    )
    if result.objective.total < result.start_objective.total - 1e-4 * (1 + abs(result.start_objective.total)):
        raise SystemExit(f"the search ended below its start: {result.objective} < {result.start_objective}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    visits = max(result.passes, 1) * args.classes
    return {
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "mkl_cbwr": (mkl_cbwr_branch() or "unset") if device.type == "cpu" else None,
        "method": args.method,
        "centroids_s": centroid_s,
        "centroids_cpu_s": centroid_cpu_s,
        "search_s": search_s,
        "search_cpu_s": search_cpu_s,
        "s3_search_s": centroid_s + search_s,
        "passes": result.passes,
        "converged": result.converged,
        "changed_from_start": int((result.chosen != result.start).sum()),
        "ms_per_class_visit": 1e3 * search_s / visits,
        "objective": result.objective.total,
        "start_objective": result.start_objective.total,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--spread", type=float, default=8.0,
                        help="within-class noise relative to the class direction (norms: spread vs 1)")
    parser.add_argument("--max-passes", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--method", choices=SEARCH_METHODS, default="auto",
                        help="search method of igds_fast.select (auto: table on the CPU, recompute on a GPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CPU, plus CUDA when available")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per step (median), after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' = stdout)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = S3Config(groups=args.groups, max_passes=args.max_passes)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    torch.set_grad_enabled(False)

    rows = [bench_device(device, args, config) for device in devices]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/s3_select.py", *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__,
        "shape": {"C": args.classes, "G": args.groups, "K": args.images, "d": args.dim},
        "config": config.to_dict(),
        "dtype": args.dtype,
        "repeat": args.repeat,
        "results": rows,
    }
    print(f"S3 selection, C={args.classes} G={args.groups} K={args.images} d={args.dim}, {args.dtype}, "
          f"alpha={config.closeness_weight} beta={config.separation_weight} eps={config.eps} "
          f"max_passes={config.max_passes}")
    print("| device | method | centroids s | search s (CPU s) | s3_search s | passes | changed | ms/class visit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        label = row["device"] + (f" ({row['threads']} threads, MKL_CBWR {row['mkl_cbwr']})" if row["threads"]
                                 else f" ({row['device_name']})")
        print(f"| {label} | {row['method']} | {row['centroids_s']:.3f} | {row['search_s']:.3f} "
              f"({row['search_cpu_s']:.1f}) | {row['s3_search_s']:.3f} | "
              f"{row['passes']}{'' if row['converged'] else ' (cap)'} | {row['changed_from_start']} | "
              f"{row['ms_per_class_visit']:.3f} |")
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
