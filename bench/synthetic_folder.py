"""Synthetic class folders for the memory benches (bench/data.py, bench/probe_memory.py).

root/class_KK/NNNNN.<suffix>: per class, smooth random RGB images (a coarse random grid resized
bilinearly to side x side, half-blended with a class colour), written once: a `.complete` marker
makes a later call with the same root return at once.
"""
from __future__ import annotations

import os


def write_smooth_class_folder(root: str, classes: int, per_class: int, side: int, seed: int, coarse: int,
                              suffix: str, **save_options) -> None:
    import numpy as np
    from PIL import Image

    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = os.path.join(root, f"class_{label:02d}")
        os.makedirs(folder, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for index in range(per_class):
            grid = rng.integers(0, 256, size=(coarse, coarse, 3)).astype(np.uint8)
            image = Image.fromarray(grid).resize((side, side), Image.BILINEAR)
            pixels = (np.asarray(image, dtype=np.float32) * 0.5 + base * 0.5).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{index:05d}.{suffix}"), **save_options)
    open(done, "w").close()
