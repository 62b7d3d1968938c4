"""S³'s centroids: subgroup centroids, the streamed class-centroid accumulator, the seeded real draw."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..errors import IGDSInputError
from .config import ZERO_CENTROID_NORM, check_dtype, check_finite_unit, check_int, check_tensor, first_index

_CENTROID_BATCH = 4096  # rows per ClassCentroidAccumulator.add in class_centroids


# ----------------------------------------------------------------------------------------------
# centroids
# ----------------------------------------------------------------------------------------------


def subgroup_centroids(
    candidate_features: torch.Tensor, *, dtype: torch.dtype = torch.float32, classes_per_chunk: int = 64
) -> torch.Tensor:
    """c_{i,g} = normalize(mean_k phi_{i,g,k}): [C, G, K, d] L2-normalised features -> [C, G, d].

    Checked on the way (one-line IGDSInputError): 4-D, G >= 1 (no empty dimension), finite, every
    feature vector of unit norm, no subgroup averaging to the zero vector. Works through
    `classes_per_chunk` classes at a time, so a float16/bfloat16 input is never converted whole;
    the chunking does not change any value (each class's mean is its own reduction).
    """
    dtype = check_dtype(dtype)
    check_tensor("candidate_features", candidate_features, 4, "[C, G, K, d]")
    check_int("classes_per_chunk", classes_per_chunk, 1)
    num_classes, groups, _, dim = candidate_features.shape
    out = torch.empty((num_classes, groups, dim), dtype=dtype, device=candidate_features.device)
    for start in range(0, num_classes, classes_per_chunk):
        chunk = candidate_features[start : start + classes_per_chunk].to(dtype)
        check_finite_unit("candidate_features", chunk, offset=start)
        mean = chunk.mean(dim=2)  # [c, G, d]
        short = torch.linalg.vector_norm(mean, dim=-1) < ZERO_CENTROID_NORM
        if bool(short.any()):
            where = first_index(short, start)
            raise IGDSInputError(
                f"subgroup {where[1]} of class {where[0]} averages to the zero vector: its centroid has no direction"
            )
        out[start : start + chunk.shape[0]] = F.normalize(mean, dim=-1)
    return out


class ClassCentroidAccumulator:
    """Real class centroids r_i = normalize(sum of features of class i), streamed batch by batch.

    Holds only [C, d] float64 sums and [C] counts, so memory does not grow with the dataset.
    max_per_class: keep at most this many images per class (the first ones seen, in batch order);
        None = all. Choose *which* images with `select_real_indices` before streaming.
    """

    def __init__(self, num_classes: int, dim: int, *, max_per_class: int | None = None, device=None):
        check_int("num_classes", num_classes, 1)
        check_int("feature dim", dim, 1)
        if max_per_class is not None:
            check_int("max_per_class", max_per_class, 1)
        self.num_classes = num_classes
        self.dim = dim
        self.max_per_class = max_per_class
        self.sums = torch.zeros((num_classes, dim), dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: features [B, d] L2-normalised, labels [B] integer class indices in [0, C)."""
        check_tensor("features", features, 2, "[B, d]")
        if features.shape[1] != self.dim:
            raise IGDSInputError(f"features must be [B, {self.dim}], got {tuple(features.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise IGDSInputError("labels must be an integer tensor [B]")
        if tuple(labels.shape) != (features.shape[0],):
            raise IGDSInputError(
                f"labels must be [B] = [{features.shape[0]}] to match the features, got {tuple(labels.shape)}"
            )
        features = features.to(device=self.sums.device, dtype=torch.float64)
        labels = labels.to(device=self.sums.device, dtype=torch.int64)
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise IGDSInputError(
                f"labels must lie in [0, {self.num_classes}), got {int(labels.min())}..{int(labels.max())}"
            )
        check_finite_unit("features", features)
        if self.max_per_class is not None:
            keep = self._rank_in_batch(labels) + self.counts[labels] < self.max_per_class
            features, labels = features[keep], labels[keep]
            if labels.numel() == 0:
                return
        present, inverse = torch.unique(labels, return_inverse=True)  # sorted; [U], [B]
        one_hot = F.one_hot(inverse, present.numel()).to(torch.float64)  # [B, U]
        # a matmul, not index_add_: no atomics, so the sums are the same on every run
        self.sums[present] += one_hot.T @ features
        self.counts[present] += one_hot.sum(0).to(torch.int64)

    @staticmethod
    def _rank_in_batch(labels: torch.Tensor) -> torch.Tensor:
        """[B] position of each row among the batch's rows of the same label (0 = first seen)."""
        order = torch.argsort(labels, stable=True)
        ordered = labels[order]
        first = torch.searchsorted(ordered, ordered)  # first position of each label in sorted order
        rank = torch.empty_like(labels)
        rank[order] = torch.arange(labels.numel(), device=labels.device) - first
        return rank

    def centroids(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[C, d] normalised class centroids; one-line error if a class got no image."""
        missing = (self.counts == 0).nonzero().flatten().tolist()
        if missing:
            shown = ", ".join(str(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise IGDSInputError(f"{len(missing)} classes have no real features: {shown}")
        short = torch.linalg.vector_norm(self.sums, dim=-1) < ZERO_CENTROID_NORM * self.counts
        if bool(short.any()):
            raise IGDSInputError(
                f"the real features of class {int(short.nonzero()[0])} average to the zero vector"
            )
        return F.normalize(self.sums, dim=-1).to(check_dtype(dtype))


def class_centroids(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[C, d] real centroids r_i = normalize(mean of features [N, d] with labels [N] == i).

    Adds `_CENTROID_BATCH` rows at a time, so the per-batch [rows, classes] one-hot stays small.
    """
    check_tensor("features", features, 2, "[N, d]")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (features.shape[0],):
        raise IGDSInputError(f"labels must be a [N] = [{features.shape[0]}] tensor matching the features")
    accumulator = ClassCentroidAccumulator(num_classes, features.shape[1], device=features.device)
    for start in range(0, features.shape[0], _CENTROID_BATCH):
        accumulator.add(features[start : start + _CENTROID_BATCH], labels[start : start + _CENTROID_BATCH])
    return accumulator.centroids(dtype)


def select_real_indices(labels: torch.Tensor, num_classes: int, per_class: int = 200, seed: int = 0) -> torch.Tensor:
    """Indices of up to `per_class` real images per class, drawn without replacement with `seed`.

    labels: [N] integer class of every real training image (small even for ImageNet: 1.3M ints).
    Returns a sorted [M] int64 tensor (M <= C * per_class), so the images can be read in dataset
    order; the same labels and seed give the same indices.
    """
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise IGDSInputError("labels must be a 1-D integer tensor [N]")
    check_int("num_classes", num_classes, 1)
    check_int("real_per_class", per_class, 1)
    check_int("seed", seed, 0)
    labels = labels.to("cpu", torch.int64)
    if labels.numel() and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise IGDSInputError(f"labels must lie in [0, {num_classes})")
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(labels.numel(), generator=generator)
    grouped = shuffled[torch.argsort(labels[shuffled], stable=True)]  # by class, random within it
    rank = ClassCentroidAccumulator._rank_in_batch(labels[grouped])  # position within its class
    return torch.sort(grouped[rank < per_class]).values
