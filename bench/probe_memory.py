"""Peak resident memory of train-ve's classifier stage as the training set grows (issue 28, item 1).

    python bench/probe_memory.py                          # 4,000 and 40,000 images, this checkout
    python bench/probe_memory.py --sizes 4000,40000 --pythonpath /tmp/igds-before   # another checkout

For each size it writes (once, reused) a 10-class ImageFolder of synthetic 16 x 16 PNGs under --root,
then runs, in a fresh process,

    igds-fast train-ve --data ROOT/nN --arch resnet50 --resolution 16 --epochs 0 --classifier-epochs 1
                       --device cpu --quiet --out OUT/ve.safetensors

(ResNet-50: d = 2048 features per image; --epochs 0 keeps the initial encoder, so the run is the
scan, the feature pass, the linear probe, the centroids and the report) and prints that process's
peak resident set (ru_maxrss: file pages it mapped count too), the largest DataLoader worker's and
the wall time, as a markdown table. The images are held in memory below IGDS_IN_MEMORY_MB (default
256 MiB: 40,000 such images are 30 MB); --stream streams them (IGDS_IN_MEMORY_MB=0). The flat-memory criterion of the issue: peak RSS at 40,000
images within 150 MB of the peak at 4,000.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.cli_child import child  # noqa: E402
from bench.synthetic_folder import write_smooth_class_folder  # noqa: E402

CLASSES = 10
SIDE = 16
FLAT_WITHIN_MB = 150


def make_folder(root: str, images: int, seed: int) -> None:
    """root/class_k/NNNNN.png: `images` smooth random SIDE x SIDE RGB images over CLASSES classes (written once)."""
    write_smooth_class_folder(root, CLASSES, images // CLASSES, SIDE, seed, coarse=4, suffix="png")


def command(data: str, out: str) -> list[str]:
    return ["train-ve", "--data", data, "--arch", "resnet50", "--resolution", str(SIDE), "--epochs", "0",
            "--classifier-epochs", "1", "--device", "cpu", "--quiet", "--out", os.path.join(out, "ve.safetensors")]


def run_child(argv: list[str], pythonpath: str, stream: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    if stream:
        env["IGDS_IN_MEMORY_MB"] = "0"
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv], env=env,
                               capture_output=True, text=True)
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
    return {"code": completed.returncode, "error": " | ".join(tail)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4000,40000", help="training images per run")
    parser.add_argument("--root", default="/tmp/igds_bench_probe")
    parser.add_argument("--pythonpath", default=REPO, help="checkout whose igds_fast runs the command")
    parser.add_argument("--tag", default="current", help="names the output folders of this run")
    parser.add_argument("--stream", action="store_true", help="IGDS_IN_MEMORY_MB=0: the images streamed, not held")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        data = os.path.join(args.root, f"n{size}")
        make_folder(data, size, seed=size)
        out = os.path.join(args.root, f"out_{args.tag}_n{size}")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        result = run_child(command(data, out), args.pythonpath, args.stream)
        rows.append({"images": size, **result})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    mode = "IGDS_IN_MEMORY_MB=0 " if args.stream else ""
    print(f"command: {mode}igds-fast {' '.join(command('ROOT/nN', 'OUT'))}  (PYTHONPATH={args.pythonpath})")
    print("| images | peak RSS (MiB) | largest worker (MiB) | wall (s) |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['images']} | failed: {row['error']} | | |")
        else:
            print(f"| {row['images']:,} | {row['peak_mib']:.0f} | {row['worker_peak_mib']:.0f} | {row['seconds']:.1f} |")
    good = [row for row in rows if "error" not in row]
    if len(good) >= 2:
        growth = (good[-1]["peak_mib"] - good[0]["peak_mib"]) * 1.048576  # MiB -> MB
        verdict = "flat" if growth <= FLAT_WITHIN_MB else "NOT flat"
        print(f"\npeak RSS growth {good[0]['images']:,} -> {good[-1]['images']:,} images: {growth:+.0f} MB "
              f"({verdict}: criterion within {FLAT_WITHIN_MB} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
