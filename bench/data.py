"""Peak resident memory and images/s of the data paths of train-ve, calibrate-beta and eval.

    python bench/data.py                      # 1,000 and 4,000 synthetic 224-px JPEGs, streamed
    python bench/data.py --sizes 1000,8000 --modes stream,default --workers 2

For each dataset size it writes (once, reused) 10-class ImageFolders of synthetic 224 x 224 JPEGs
under --root (train: N images, val: N images, distilled: 1 per class), then runs every command in a
fresh process and reports that process's peak resident set (ru_maxrss), the largest DataLoader
worker's, and the wall time:

* train-ve --epochs 0 (scan, features, classifier, centroids) and --epochs 1 (plus one MoCo epoch,
  BN statistics), ResNet-18 at --resolution 32 on images loaded at 224 (resized by the encoder);
* calibrate-beta with the --epochs 0 VE (scoring pass, subsets, streamed validation accuracy);
* eval of the distilled folder against the N-image validation folder (streamed accuracy).

Modes: "stream" sets IGDS_IN_MEMORY_MB=0 (every real set streamed: the peak must not grow with N);
"default" leaves the cap at its default (sets under 256 MiB of uint8 pixels are held).
Command rows give N / wall time (each command decodes its sets 2-4 times: the scan, then its
passes); "loader" rows: images/s of the streamed decode path alone (FolderImages.uint8_batches over the
training folder, batch 256), the rate the loader can feed a device with.

--pythonpath runs the commands from another checkout (e.g. an export of an older commit) to
compare against the in-memory loader. Numbers are printed as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.cli_child import child  # noqa: E402
from bench.synthetic_folder import write_smooth_class_folder  # noqa: E402

CLASSES = 10
SIDE = 224


def make_folder(root: str, per_class: int, seed: int) -> None:
    """root/class_k/NNNNN.jpg, per_class smooth random 224 x 224 images per class (written once)."""
    write_smooth_class_folder(root, CLASSES, per_class, SIDE, seed, coarse=8, suffix="jpg", quality=90)


def loader_child(root: str, workers: int) -> None:
    from igds_fast.data import FolderImages

    started = time.perf_counter()
    source = FolderImages(root, SIDE, in_memory=False, num_workers=workers)
    scanned = time.perf_counter()
    count = 0
    chunks = [slice(start, min(start + 256, len(source))) for start in range(0, len(source), 256)]
    for images, _, _ in source.uint8_batches(chunks):
        count += images.shape[0]
    finished = time.perf_counter()
    print("BENCH " + json.dumps({
        "code": 0, "seconds": finished - started, "scan_images_per_s": len(source) / (scanned - started),
        "images_per_s": count / (finished - scanned),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def run(args_list: list[str], env: dict, pythonpath: str) -> dict:
    env = dict(env, PYTHONPATH=pythonpath)
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), *args_list], env=env,
                               capture_output=True, text=True)
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
    return {"code": completed.returncode, "error": " | ".join(tail)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4000", help="training (and validation) images per set")
    parser.add_argument("--modes", default="stream", help="stream and/or default (see the docstring)")
    parser.add_argument("--root", default="/tmp/igds_bench_data")
    parser.add_argument("--workers", type=int, default=None, help="IGDS_DATA_WORKERS (default: min(8, CPUs))")
    parser.add_argument("--pythonpath", default=REPO, help="checkout whose igds_fast runs the commands")
    parser.add_argument("--tag", default="current", help="names the output folders of this run")
    parser.add_argument("--commands", default="loader,train-ve-0,train-ve-1,calibrate-beta,eval")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--loader-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    if args.loader_child is not None:
        loader_child(args.loader_child[0], int(args.loader_child[1]))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    commands = args.commands.split(",")
    env = dict(os.environ)
    if args.workers is not None:
        env["IGDS_DATA_WORKERS"] = str(args.workers)
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    rows = []
    for size in sizes:
        base = os.path.join(args.root, f"n{size}")
        for split, count, seed in (("train", size, 1), ("val", size, 2), ("distilled", CLASSES, 3)):
            make_folder(os.path.join(base, split), count // CLASSES, seed + size)
        train, val, distilled = (os.path.join(base, s) for s in ("train", "val", "distilled"))
        for mode in modes:
            mode_env = dict(env)
            if mode == "stream":
                mode_env["IGDS_IN_MEMORY_MB"] = "0"
            else:
                mode_env.pop("IGDS_IN_MEMORY_MB", None)
            out = os.path.join(base, f"out_{mode}_{args.tag}")
            os.makedirs(out, exist_ok=True)
            ve0 = os.path.join(out, "ve0.safetensors")
            common_ve = ["--resolution", "32", "--image-size", str(SIDE), "--classifier-epochs", "10",
                         "--device", "cpu", "--quiet"]
            plan = {
                "loader": ["--loader-child", train, str(workers)],
                "train-ve-0": ["--child", "train-ve", "--data", train, "--out", ve0, "--epochs", "0", *common_ve],
                "train-ve-1": ["--child", "train-ve", "--data", train, "--out", os.path.join(out, "ve1.safetensors"),
                               "--epochs", "1", "--batch-size", "64", "--queue-size", "256", *common_ve],
                "calibrate-beta": ["--child", "calibrate-beta", "--data", train, "--val", val, "--ve", ve0,
                                   "--ipc", "1", "--betas", "0", "--epochs", "1", "--width", "16",
                                   "--image-size", str(SIDE), "--device", "cpu", "--out",
                                   os.path.join(out, "beta.json"), "--quiet"],
                "eval": ["--child", "eval", "--train", distilled, "--val", val, "--network", "convnet3",
                         "--width", "16", "--epochs", "1", "--seeds", "1", "--image-size", str(SIDE),
                         "--device", "cpu", "--quiet", "--out", os.path.join(out, "eval.json")],
            }
            for name in commands:
                if name == "calibrate-beta" and not os.path.exists(ve0):
                    result = {"code": None, "error": "needs train-ve-0 first"}
                else:
                    result = run(plan[name], mode_env, args.pythonpath)
                rows.append({"images": size, "mode": mode, "command": name, **result})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    print("| images | mode | command | peak RSS (MiB) | largest worker (MiB) | wall (s) | images/s |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['images']} | {row['mode']} | {row['command']} | failed: {row['error']} | | | |")
            continue
        rate = row.get("images_per_s")
        if rate is None:  # the set's size over the command's wall time (it decodes the set 2-4 times)
            rate_text = f"{row['images'] / row['seconds']:.0f} (set / wall)"
        else:
            rate_text = f"{rate:.0f} (loader; scan {row['scan_images_per_s']:.0f})"
        print(f"| {row['images']} | {row['mode']} | {row['command']} | {row['peak_mib']:.0f} | "
              f"{row['worker_peak_mib']:.0f} | {row['seconds']:.1f} | {rate_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
