"""Per-image randomness: every image's noise is keyed by its own seed, never by its batch.

An image's seed is derived from (global seed, class key, image index); its initial noise x_T and the
noise of every reverse step come from generators seeded by (image seed, stream), so the image is
the same whatever batch, batch size, order, world size or resume point it is sampled in.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

MASK64 = (1 << 64) - 1
INITIAL_NOISE_STREAM = -1  # stream of x_T; reverse step i uses stream i >= 0


def splitmix64(value: int) -> int:
    """One round of SplitMix64 (Steele et al.): a bijective 64-bit mixer."""
    value = (value + 0x9E3779B97F4A7C15) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def stream_seed(image_seed: int, stream: int) -> int:
    """A 63-bit generator seed for (image seed, stream) (63 bits: torch seeds are signed-safe)."""
    return splitmix64(splitmix64(image_seed & MASK64) ^ (stream & MASK64)) >> 1


def image_seed(global_seed: int, class_key: str, index: int) -> int:
    """The seed of image `index` of class `class_key` (a wnid or class name) under `global_seed`.

    Uses the class *name*, not its label index, so a class keeps its images when the class
    selection changes. 63-bit, stable across Python versions and machines (sha256, not hash()).
    """
    digest = hashlib.sha256(f"{int(global_seed)}/{class_key}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_normal(
    seeds: Sequence[int], stream: int, shape: Sequence[int], device, dtype=torch.float32
) -> torch.Tensor:
    """Standard normal noise [B, *shape], row b drawn from a generator seeded by (seeds[b], stream).

    Drawn on `device` with that device's generator: CPU results are identical on every CPU machine.
    """
    device = torch.device(device)
    rows = []
    for seed in seeds:
        generator = torch.Generator(device=device)
        generator.manual_seed(stream_seed(int(seed), stream))
        rows.append(torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype))
    return torch.stack(rows)
