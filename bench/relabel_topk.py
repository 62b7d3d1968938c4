"""The effect of `--soft-label-topk K` (SRe2L's keep_top_k) on an sre2l evaluation, measured on real images.

scikit-learn's digits (10 classes, 8x8 grey, upscaled to 32 px RGB): a convnet3 teacher trained on the
first 1,000 images; the "distilled" set is a random 10 per class of those; the test split is the other
797. For each K (0 = every class's fp16 logit, SRe2L's default) the same `igds-fast eval --protocol sre2l`
(convnet3 student, T 20, batch 20, EPOCHS epochs, SEEDS seeds) runs with its own relabel folder, and the
script reports the relabel storage, the mean KL(full || top-K) of the soft labels the student learns
from (over every recorded crop) and the test accuracy (last epoch, mean ± std over seeds).

    PYTHONPATH=$PWD python bench/relabel_topk.py [--epochs 30] [--seeds 2] [--topk 0,1,3,5]

A toy: 10 classes, so it shows what the truncation does to the targets and whether a student notices,
not the effect at ImageNet-1K's 1,000 classes (not measurable here without a trained ImageNet teacher).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from igds_fast.cli import main as cli
from igds_fast.evaluate.networks import build_eval_network
from igds_fast.evaluate.protocol import IMAGENET_MEAN, IMAGENET_STD, NormalizedInput
from igds_fast.evaluate.relabel import RelabelReader, RelabelSpec


def write_digits(root: str, images: np.ndarray, labels: np.ndarray) -> None:
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, f"digit{label}")
        os.makedirs(folder, exist_ok=True)
        grey = (image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(grey).resize((32, 32), Image.BILINEAR).convert("RGB").save(os.path.join(folder, f"{index:05d}.png"))


def train_teacher(folder: str, path: str, epochs: int = 8) -> float:
    from igds_fast.data import load_image_folder

    images, labels, _, _ = load_image_folder(folder, 32)
    torch.manual_seed(0)
    network = build_eval_network("convnet3", 3, 10, 32)
    model = NormalizedInput(network, IMAGENET_MEAN, IMAGENET_STD)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(order), 50):
            batch = order[start:start + 50]
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    torch.save(network.state_dict(), path)
    return 100.0 * accuracy


def mean_kl_to_full(full_dir: str, topk_dir: str, temperature: float) -> float:
    def reader(folder):
        spec = json.load(open(os.path.join(folder, "relabel.json")))
        spec = {k: v for k, v in spec.items() if k not in ("format", "version")}
        return RelabelReader(folder, RelabelSpec(**spec))

    full, top = reader(full_dir), reader(topk_dir)
    total, count = 0.0, 0
    for epoch in range(full.spec.epochs):
        p = full.soft_targets(epoch, 0, full.spec.count, temperature)
        q = top.soft_targets(epoch, 0, top.spec.count, temperature)
        total += float((p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum())
        count += p.shape[0]
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--topk", default="0,1,3,5")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    digits = load_digits()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as work:
        train_x, train_y = digits.images[:1000], digits.target[:1000]
        rng = np.random.default_rng(0)
        subset = np.concatenate([rng.choice(np.flatnonzero(train_y == c), 10, replace=False) for c in range(10)])
        write_digits(os.path.join(work, "real"), train_x, train_y)
        write_digits(os.path.join(work, "distilled"), train_x[subset], train_y[subset])
        write_digits(os.path.join(work, "test"), digits.images[1000:], digits.target[1000:])
        teacher = os.path.join(work, "teacher.pt")
        teacher_accuracy = train_teacher(os.path.join(work, "real"), teacher)
        print(f"teacher convnet3: {teacher_accuracy:.1f}% on its 1,000 training digits", file=sys.stderr)
        rows = []
        for k in (int(v) for v in args.topk.split(",")):
            out, relabel = os.path.join(work, f"k{k}.json"), os.path.join(work, f"relabel_k{k}")
            started = time.perf_counter()
            argv = ["eval", "--train", os.path.join(work, "distilled"), "--val", os.path.join(work, "test"),
                    "--protocol", "sre2l", "--teacher", teacher, "--teacher-arch", "convnet3", "--network", "convnet3",
                    "--image-size", "32", "--epochs", str(args.epochs), "--batch-size", "20", "--seeds",
                    str(args.seeds), "--device", "cpu", "--quiet", "--relabel-dir", relabel, "--out", out]
            if k:
                argv += ["--soft-label-topk", str(k)]
            assert cli(argv) == 0
            result = json.load(open(out))
            size = sum(os.path.getsize(os.path.join(relabel, n)) for n in os.listdir(relabel) if n.startswith("epoch_"))
            kl = 0.0 if not k else mean_kl_to_full(os.path.join(work, "relabel_k0"), relabel, 20.0)
            rows.append((k, size, kl, result["mean"], result["std"], time.perf_counter() - started))
        print(f"\nsre2l on digits (10 classes), convnet3 teacher and student, T 20, {args.epochs} epochs, "
              f"{args.seeds} seeds, torch {torch.__version__}")
        print("top-k  relabel bytes  KL(full || top-k) per crop  last-epoch accuracy (%)  seconds")
        for k, size, kl, mean, std, seconds in rows:
            print(f"{k if k else 'all':>5}  {size:>13,}  {kl:>26.2e}  {mean:>16.2f} ± {std:.2f}  {seconds:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
