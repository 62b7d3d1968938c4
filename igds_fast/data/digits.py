"""scikit-learn's bundled digits as a fixed stratified train / test split.
"""
from __future__ import annotations

from functools import lru_cache


import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IGDSInputError

@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # optional extra: pip install igds_fast[digits]
        raise ImportError("the digits dataset needs scikit-learn: pip install 'igds_fast[digits]'") from exc
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: (train indices, test indices), each sorted ascending.

    Per class (in label order) a permutation from ``numpy.random.default_rng(seed)`` picks
    ``round(test_fraction * n_class)`` test samples, at least 1 and at most n_class - 1.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            raise IGDSInputError(f"class {label} has {len(members)} sample(s); a split needs at least 2")
        num_test = min(max(int(round(test_fraction * len(members))), 1), len(members) - 1)
        shuffled = rng.permutation(members)
        test.append(shuffled[:num_test])
        train.append(shuffled[num_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_split(
    image_size: int = 16, test_fraction: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (1797 8x8 images, 10 classes) as a fixed stratified split.

    Returns ``(train_x, train_y, test_x, test_y)``: float32 [N, 1, S, S] in [-1, 1] (pixel values
    0..16 mapped as v / 8 - 1), labels int64 = the digit. Images are resized from 8x8 to
    ``image_size`` bilinearly (align_corners=False; antialiased when shrinking). The split depends
    only on (test_fraction, seed): see :func:`stratified_split`.
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise IGDSInputError(f"image_size must be a positive integer, got {image_size!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise IGDSInputError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    raw_images, targets = _digits_arrays()
    images = torch.from_numpy(raw_images / 8.0 - 1.0).unsqueeze(1)
    if image_size != images.shape[-1]:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False,
            antialias=image_size < images.shape[-1],
        ).clamp(-1.0, 1.0)
    train_index, test_index = stratified_split(targets, float(test_fraction), seed)
    labels = torch.from_numpy(targets)
    train_index_t, test_index_t = torch.from_numpy(train_index), torch.from_numpy(test_index)
    return (
        images[train_index_t].contiguous(),
        labels[train_index_t].contiguous(),
        images[test_index_t].contiguous(),
        labels[test_index_t].contiguous(),
    )
