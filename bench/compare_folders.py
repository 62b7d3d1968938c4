"""Compare two distilled folders image by image: PSNR and the VE's label agreement.

    python bench/compare_folders.py --reference OUT_EAGER --candidate OUT_COMPILED --ve ve.safetensors

Both folders come from `igds-fast distill` with the same settings and the same noise (the eager run
with `--noise philox`, which the compiled backend always draws), so image k of class c is the same
sample in both: the candidate should differ only by its arithmetic. Printed: image count, PSNR in dB
(pixels scaled to [-1, 1], peak-to-peak 2; median, 10th percentile, minimum), the share of images
whose VE argmax is the same in both folders, and each folder's share classified as its own class.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

from igds_fast.ve import VariationalEstimator


def load_folder(root: str) -> dict[str, np.ndarray]:
    """{relative path: uint8 array} of every PNG under OUT/<class>/ (the manifest's images)."""
    with open(os.path.join(root, "manifest.json")) as handle:
        manifest = json.load(handle)
    return {entry["path"]: np.asarray(Image.open(os.path.join(root, entry["path"]))) for entry in manifest["images"]}


def to_model_range(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0)
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True)
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--ve", required=True)
    args = parser.parse_args(argv)
    reference, candidate = load_folder(args.reference), load_folder(args.candidate)
    if set(reference) != set(candidate):
        print(f"error: the folders hold other images ({len(set(reference) ^ set(candidate))} differ)", file=sys.stderr)
        return 2
    ve = VariationalEstimator.load(args.ve).eval()
    names = sorted(reference)
    classes = [name.split("/")[0] for name in names]
    labels = torch.tensor([ve.class_names.index(c) for c in classes])
    a = torch.stack([to_model_range(reference[name]) for name in names])
    b = torch.stack([to_model_range(candidate[name]) for name in names])
    values = np.array([psnr(x, y) for x, y in zip(a, b)])
    with torch.no_grad():
        pred_a, pred_b = ve(a).argmax(1), ve(b).argmax(1)
    finite = values[np.isfinite(values)]
    print(f"images {len(names)}; identical {int(np.isinf(values).sum())}")
    if finite.size:
        print(f"PSNR dB: median {np.median(finite):.1f}, 10th percentile {np.percentile(finite, 10):.1f}, "
              f"min {finite.min():.1f} (over the {finite.size} non-identical images)")
    print(f"VE argmax agreement {float((pred_a == pred_b).double().mean()):.3f}; "
          f"own class: reference {float((pred_a == labels).double().mean()):.3f}, "
          f"candidate {float((pred_b == labels).double().mean()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
