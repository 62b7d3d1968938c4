"""Selective Subgroup Sampling (S³, IMS3, CVPR 2026): per class, keep the best of G generated subgroups.

For every class i the generator produces G candidate subgroups of K images each; a subgroup is kept
or dropped whole. With L2-normalised features phi(x) from a frozen encoder:

    r_i      = normalize(mean phi(x) over up to N real images of class i)             [C, d]
    c_{i,g}  = normalize(mean phi(x) over the K images of subgroup g of class i)       [C, G, d]
    d(u, v)  = 1 - cos(u, v)  (cos clamped to [-1, 1], so 0 <= d <= 2)

and one subgroup g_i per class is chosen to maximise

    L = alpha * sum_i -log(d(c_{i,g_i}, r_i) + eps) + beta * sum_{i<j} log(d(c_{i,g_i}, c_{j,g_j}) + eps)
        \\_____________ own term (unweighted) ____/          \\______ pair term (unweighted) ______/

Search: every class starts at its subgroup closest to its real centroid; then coordinate ascent
visits the classes in turn, tries every subgroup of the visited class with the others fixed and
keeps a strict improvement; it stops after a pass without improvement or after `max_passes` passes.

Facts matched with the public code (Westlake-AGI-Lab/IMS3, ``centroid.py`` and ``run.sh``; read,
not copied):

* centroids are mean-then-normalise (``F.normalize``), d = 1 - clamp(cos, -1, 1);
* start: per class the argmin of d(c_{i,g}, r_i), lowest index on ties (``torch.argmin``). The
  paper's Algorithm 2 says random initialisation; the code (and this module) uses closest-to-real;
* classes are visited in index order 0..C-1; within a class the subgroups are tried in index order
  and a subgroup replaces the current one only if the objective is *strictly* larger than the best
  so far, so a tie keeps the current choice and among equally good improvements the lowest index
  wins; a change takes effect immediately for the next class (Gauss-Seidel, not Jacobi);
* a pass without any change stops the search, otherwise at most `max_passes` (``--sel-max-iters``,
  default 5) passes run; `passes` in the result counts them, the final no-change pass included;
* the pair term runs over i < j (``triu_indices(offset=1)``), each pair counted once;
* defaults alpha = 0.4, beta = 0.9, eps = 0, G = 5 are ``run.sh``'s ImageWoof IPC-10 setting
  (``centroid.py``'s own argparse defaults are 1.0 / 1.0 / 1e-6); N = 200 real images per class.

Choices made here (where the public code leaves a gap or does the slow thing):

* eps = 0 with d = 0 is not guarded in the public code (log 0 = -inf, inf - inf = nan, and a nan
  objective silently never wins a comparison). Here the argument of every log is floored at
  `LOG_FLOOR` = 1e-12, so the objective is always finite; this changes a value only where
  d + eps < 1e-12, i.e. for centroids identical to rounding (in float32 1 - cos has a spacing of
  6e-8, so the floor only ever replaces an exact 0).
* The public code re-evaluates the whole objective (all C^2 pairs) for every trial move. Changing
  class i's choice changes only the terms that involve i, so the visit of class i scores all G
  candidates at once with ``gain[g] = alpha * own[i, g] + beta * sum_{j != i} log(d(c_{i,g},
  c_{j,g_j}) + eps)``; L(g) - L(current) = gain[g] - gain[current] exactly in real arithmetic, so
  the decisions are the same ones. Two ways to get the [G, C] log distances of a visit:
  "recompute" does one [G, d] x [d, C] matmul per visit (a pass = C * G * C * d multiply-adds,
  4.1e10 at C = 1000, G = 20, d = 2048; memory [G, C]; no host synchronisation inside a pass — the
  GPU path); "table" keeps a [C, G, C] table (80 MB at that size) built once with large matmuls
  and, at each visit, recomputes only the columns of classes that changed since that row was last
  visited — the late passes, where few classes still move, cost almost nothing (the CPU path,
  chosen by "auto" when the table fits `TABLE_BYTES`). Every entry is a fresh dot product in both,
  so they differ only in matmul rounding (the tests check both against the float64 reference).
* Features are checked to be finite and L2-normalised (|norm - 1| <= `NORM_TOLERANCE`), and a
  subgroup whose features average to (almost) the zero vector is refused: its centroid would have
  no direction. The search runs in float32 by default (`dtype=torch.float64` on request); the
  reported objective values are summed in float64.
* The real images of a class are drawn by `select_real_indices` with a `torch.Generator` seed; the
  public code uses Python's ``random.Random(seed).shuffle`` per class folder — the same kind of
  draw (uniform without replacement), not the same images.

Determinism: no atomics in the search; the visit order, the matmul shapes (fixed, or fixed by the
sequence of changes) and the tie-break (lowest index, made explicit rather than left to
``argmax``/``argmin`` on the device) are fixed, so repeated runs on the same device return the
same choice. `subgroup_centroids` chunks over classes only, which does not change any per-class
reduction.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from igds_fast.errors import IGDSInputError
from igds_fast.settings import option

LOG_FLOOR = 1e-12  # every log argument d + eps is floored here, so eps = 0 with d = 0 stays finite
NORM_TOLERANCE = 1e-2  # |norm - 1| allowed for "L2-normalised" features (fp16/bf16-stored ones pass)
ZERO_CENTROID_NORM = 1e-6  # a mean of unit vectors shorter than this has no usable direction
COMPUTE_DTYPES = (torch.float32, torch.float64)
_PAIR_ROWS = 1024  # rows of the [rows, C] cosine block when summing the pair term (bounded memory)
SEARCH_METHODS = ("auto", "recompute", "table")
TABLE_BYTES = 512 << 20  # "auto" uses the [C, G, C] table on the CPU up to this size (C=1000, G=20: 80 MB)
_CENTROID_BATCH = 4096  # rows per ClassCentroidAccumulator.add in class_centroids
_TABLE_BLOCK_ELEMENTS = 1 << 22  # the table is built [rows * G, C] <= 4M entries at a time


# ----------------------------------------------------------------------------------------------
# configuration and results
# ----------------------------------------------------------------------------------------------


def _check_real(name: str, value, minimum: float = 0.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IGDSInputError(f"S3 {name} must be a finite number, got {value!r}")
    if value < minimum:
        raise IGDSInputError(f"S3 {name} must be >= {minimum}, got {value!r}")


def _check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise IGDSInputError(f"S3 {name} must be an integer >= {minimum}, got {value!r}")


def _check_search_settings(alpha, beta, eps, max_passes):
    _check_real("alpha", alpha)
    _check_real("beta", beta)
    _check_real("eps", eps)
    _check_int("max_passes", max_passes, 0)


@dataclass(frozen=True)
class S3Config:
    """Settings of S³ subgroup selection (defaults: IMS3's ImageWoof IPC-10 run).

    groups: G candidate subgroups generated per class (each of IPC images), >= 1.
    closeness_weight: S³'s alpha, the weight of the own term sum_i -log(d(c_i, r_i) + eps) (closeness
        of a class's subgroup to its real centroid).
    separation_weight: S³'s beta, the weight of the pair term sum_{i<j} log(d(c_i, c_j) + eps)
        (separation between the classes' subgroups).
    eps: added to every distance inside the logs (0 = the public setting; see LOG_FLOOR).
    max_passes: most coordinate-ascent passes over all classes (0 = keep the closest-to-real start).
    real_per_class: N, the most real training images per class for the real centroid.
    """

    groups: int = option(5, "--groups", parse=int, metavar="G", help="candidate subgroups of IPC images per class")
    closeness_weight: float = option(0.4, "--select-closeness-weight", parse=float, old=("--select-alpha",),
                                     help="S³'s alpha: weight of each subgroup's closeness to its class's real centroid")
    separation_weight: float = option(0.9, "--select-separation-weight", parse=float, old=("--select-beta",),
                                      help="S³'s beta: weight of the separation between the classes' subgroups")
    eps: float = option(0.0, "--select-eps", parse=float, help="added to every distance inside the logs")
    max_passes: int = option(5, "--select-max-passes", parse=int,
                             help="most coordinate-ascent passes (0 = the closest-to-real start)")
    real_per_class: int = option(200, "--real-per-class", parse=int, metavar="N",
                                 help="real images per class for the real centroid, drawn with a fixed seed")

    def __post_init__(self):
        _check_int("groups", self.groups, 1)
        _check_real("closeness_weight", self.closeness_weight)
        _check_real("separation_weight", self.separation_weight)
        _check_real("eps", self.eps)
        _check_int("max_passes", self.max_passes, 0)
        _check_int("real_per_class", self.real_per_class, 1)

    def search_kwargs(self) -> dict:
        """The keyword arguments of `s3_search` / `s3_select` / `s3_objective` (the paper's alpha, beta)."""
        return {"alpha": self.closeness_weight, "beta": self.separation_weight, "eps": self.eps,
                "max_passes": self.max_passes}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class S3Objective:
    """The objective of one choice: total = alpha * own_term + beta * pair_term (float64 sums).

    own_term = sum_i -log(d(c_{i,g_i}, r_i) + eps); pair_term = sum_{i<j} log(d(c_{i,g_i}, c_{j,g_j}) + eps).
    """

    total: float
    own_term: float
    pair_term: float


@dataclass(frozen=True)
class S3Result:
    """What `s3_search` found.

    chosen / start: [C] int64 subgroup indices (on the features' device) after the search and at
        its closest-to-real start. objective / start_objective: `S3Objective` of each.
    passes: coordinate-ascent passes run (the last, change-free one included).
    converged: True if a pass changed nothing (a local optimum under single-class moves); False if
        the search stopped at max_passes.
    """

    chosen: torch.Tensor
    start: torch.Tensor
    objective: S3Objective
    start_objective: S3Objective
    passes: int
    converged: bool


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise IGDSInputError(f"S3 compute dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def _check_tensor(name: str, value, ndim: int, shape_text: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise IGDSInputError(f"{name} must be a torch.Tensor {shape_text}, got {type(value).__name__}")
    if value.ndim != ndim:
        raise IGDSInputError(f"{name} must be {ndim}-D {shape_text}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise IGDSInputError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if any(size < 1 for size in value.shape):
        raise IGDSInputError(f"{name} {shape_text} must have no empty dimension, got shape {tuple(value.shape)}")
    return value


def _check_finite_unit(name: str, values: torch.Tensor, offset: int = 0):
    """values [..., d] (already in the compute dtype): finite and L2-normalised, else one-line error.

    `offset` shifts the reported leading index (for chunks of a larger tensor).
    """
    finite = torch.isfinite(values).all(dim=-1)
    if not bool(finite.all()):
        raise IGDSInputError(f"{name} has a non-finite value at index {_first_index(~finite, offset)}")
    norms = torch.linalg.vector_norm(values, dim=-1)
    off_unit = (norms - 1).abs() > NORM_TOLERANCE
    if bool(off_unit.any()):
        local = _first_index(off_unit)
        raise IGDSInputError(
            f"{name} must be L2-normalised feature vectors; the vector at index "
            f"{_first_index(off_unit, offset)} has norm {float(norms[local]):.6g}"
        )


def _first_index(mask: torch.Tensor, offset: int = 0) -> tuple:
    first = [int(i) for i in mask.nonzero()[0]]
    first[0] += offset
    return tuple(first)


def _check_real_centroids(real_centroids, num_classes: int, dim: int, device, dtype) -> torch.Tensor:
    _check_tensor("real_centroids", real_centroids, 2, "[C, d]")
    if tuple(real_centroids.shape) != (num_classes, dim):
        raise IGDSInputError(
            f"real_centroids must be [C, d] = [{num_classes}, {dim}] to match the candidates, "
            f"got {tuple(real_centroids.shape)}"
        )
    if real_centroids.device != device:
        raise IGDSInputError(
            f"real_centroids are on {real_centroids.device} but the candidates are on {device}"
        )
    real = real_centroids.to(dtype)
    _check_finite_unit("real_centroids", real)
    return real


def _check_chosen(chosen, num_classes: int, groups: int, device) -> torch.Tensor:
    if not isinstance(chosen, torch.Tensor):
        if not isinstance(chosen, Sequence) or not all(
            isinstance(g, int) and not isinstance(g, bool) for g in chosen
        ):
            raise IGDSInputError("chosen must be a [C] integer tensor or a sequence of ints")
        chosen = torch.tensor(list(chosen), dtype=torch.int64)
    if chosen.is_floating_point() or chosen.is_complex() or chosen.dtype == torch.bool:
        raise IGDSInputError(f"chosen must hold integer subgroup indices, got dtype {chosen.dtype}")
    if tuple(chosen.shape) != (num_classes,):
        raise IGDSInputError(f"chosen must be [C] = [{num_classes}], got shape {tuple(chosen.shape)}")
    chosen = chosen.to(device=device, dtype=torch.int64)
    outside = (chosen < 0) | (chosen >= groups)
    if bool(outside.any()):
        first = int(outside.nonzero()[0])
        raise IGDSInputError(
            f"chosen subgroup indices must lie in [0, {groups}); class {first} has {int(chosen[first])}"
        )
    return chosen


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
    dtype = _check_dtype(dtype)
    _check_tensor("candidate_features", candidate_features, 4, "[C, G, K, d]")
    _check_int("classes_per_chunk", classes_per_chunk, 1)
    num_classes, groups, _, dim = candidate_features.shape
    out = torch.empty((num_classes, groups, dim), dtype=dtype, device=candidate_features.device)
    for start in range(0, num_classes, classes_per_chunk):
        chunk = candidate_features[start : start + classes_per_chunk].to(dtype)
        _check_finite_unit("candidate_features", chunk, offset=start)
        mean = chunk.mean(dim=2)  # [c, G, d]
        short = torch.linalg.vector_norm(mean, dim=-1) < ZERO_CENTROID_NORM
        if bool(short.any()):
            where = _first_index(short, start)
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
        _check_int("num_classes", num_classes, 1)
        _check_int("feature dim", dim, 1)
        if max_per_class is not None:
            _check_int("max_per_class", max_per_class, 1)
        self.num_classes = num_classes
        self.dim = dim
        self.max_per_class = max_per_class
        self.sums = torch.zeros((num_classes, dim), dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: features [B, d] L2-normalised, labels [B] integer class indices in [0, C)."""
        _check_tensor("features", features, 2, "[B, d]")
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
        _check_finite_unit("features", features)
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
        return F.normalize(self.sums, dim=-1).to(_check_dtype(dtype))


def class_centroids(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[C, d] real centroids r_i = normalize(mean of features [N, d] with labels [N] == i).

    Adds `_CENTROID_BATCH` rows at a time, so the per-batch [rows, classes] one-hot stays small.
    """
    _check_tensor("features", features, 2, "[N, d]")
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
    _check_int("num_classes", num_classes, 1)
    _check_int("real_per_class", per_class, 1)
    _check_int("seed", seed, 0)
    labels = labels.to("cpu", torch.int64)
    if labels.numel() and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise IGDSInputError(f"labels must lie in [0, {num_classes})")
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(labels.numel(), generator=generator)
    grouped = shuffled[torch.argsort(labels[shuffled], stable=True)]  # by class, random within it
    rank = ClassCentroidAccumulator._rank_in_batch(labels[grouped])  # position within its class
    return torch.sort(grouped[rank < per_class]).values


# ----------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------


def _log_distance(cosines: torch.Tensor, eps: float) -> torch.Tensor:
    """log(max(1 - clamp(cos, -1, 1) + eps, LOG_FLOOR)), elementwise."""
    return torch.log(torch.clamp_min(1.0 - cosines.clamp(-1.0, 1.0) + eps, LOG_FLOOR))


def _own_matrix(centroids: torch.Tensor, real: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """own[i, g] = -log(d(c_{i,g}, r_i) + eps) and the distances d themselves, both [C, G]."""
    cosines = torch.einsum("cgd,cd->cg", centroids, real)
    return -_log_distance(cosines, eps), 1.0 - cosines.clamp(-1.0, 1.0)


def _pair_sum(picked: torch.Tensor, eps: float) -> torch.Tensor:
    """sum_{i<j} log(d(p_i, p_j) + eps) for picked [C, d], as a float64 scalar; [rows, C] at a time."""
    num_classes = picked.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=picked.device)
    columns = torch.arange(num_classes, device=picked.device)
    for start in range(0, num_classes, _PAIR_ROWS):
        block = picked[start : start + _PAIR_ROWS]
        rows = columns[start : start + block.shape[0], None]
        logd = _log_distance(block @ picked.T, eps)  # [rows, C]
        total += torch.where(columns[None, :] > rows, logd, 0).sum(dtype=torch.float64)
    return total


def _objective(own: torch.Tensor, centroids: torch.Tensor, chosen: torch.Tensor, alpha, beta, eps) -> S3Objective:
    own_term = own.gather(1, chosen[:, None]).sum(dtype=torch.float64)
    picked = centroids[torch.arange(centroids.shape[0], device=centroids.device), chosen]
    pair_term = _pair_sum(picked, eps)
    own_value, pair_value = float(own_term), float(pair_term)
    return S3Objective(alpha * own_value + beta * pair_value, own_value, pair_value)


def s3_objective_from_centroids(
    centroids: torch.Tensor,
    real_centroids: torch.Tensor,
    chosen,
    *,
    alpha: float = 0.4,
    beta: float = 0.9,
    eps: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> S3Objective:
    """The S³ objective of the choice `chosen` [C] given subgroup centroids [C, G, d] (normalised)."""
    dtype = _check_dtype(dtype)
    _check_search_settings(alpha, beta, eps, 0)
    _check_tensor("centroids", centroids, 3, "[C, G, d]")
    num_classes, groups, dim = centroids.shape
    centroids = centroids.to(dtype)
    _check_finite_unit("centroids", centroids)
    real = _check_real_centroids(real_centroids, num_classes, dim, centroids.device, dtype)
    chosen = _check_chosen(chosen, num_classes, groups, centroids.device)
    own, _ = _own_matrix(centroids, real, eps)
    return _objective(own, centroids, chosen, alpha, beta, eps)


def s3_objective(
    candidate_features: torch.Tensor,
    real_centroids: torch.Tensor,
    chosen,
    *,
    alpha: float = 0.4,
    beta: float = 0.9,
    eps: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> S3Objective:
    """The S³ objective L of the choice `chosen` [C] for candidate features [C, G, K, d]."""
    _check_search_settings(alpha, beta, eps, 0)
    centroids = subgroup_centroids(candidate_features, dtype=dtype)
    return s3_objective_from_centroids(centroids, real_centroids, chosen, alpha=alpha, beta=beta, eps=eps, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# the search
# ----------------------------------------------------------------------------------------------


def _first_extreme(values: torch.Tensor, largest: bool) -> torch.Tensor:
    """Index of the first max (or min) along the last dim, lowest index on ties; no host sync."""
    extreme = values.amax(-1, keepdim=True) if largest else values.amin(-1, keepdim=True)
    positions = torch.arange(values.shape[-1], device=values.device).expand_as(values)
    return torch.where(values == extreme, positions, values.shape[-1]).amin(-1)


def _ascent_recompute(centroids, own, chosen, picked, alpha, beta, eps, max_passes) -> tuple[int, bool]:
    """Coordinate ascent that recomputes class i's [G, C] log distances at every visit.

    Work per pass C * G * C * d multiply-adds; memory [G, C]; no host synchronisation inside a
    pass (decisions are device tensors), so it suits a GPU. Updates chosen [C] / picked [C, d] in place.
    """
    passes = 0
    for _ in range(max_passes):
        passes += 1
        changed = torch.zeros((), dtype=torch.bool, device=centroids.device)
        for i in range(centroids.shape[0]):
            candidates = centroids[i]  # [G, d]
            logd = _log_distance(candidates @ picked.T, eps)  # [G, C]
            logd[:, i] = 0.0  # class i's own column is not a pair
            gain = alpha * own[i] + beta * logd.sum(dim=1)  # [G] = L(g) - (terms without class i)
            current = chosen[i : i + 1]
            best = _first_extreme(gain, largest=True).view(1)
            better = gain.gather(0, best) > gain.gather(0, current)  # strict: a tie keeps current
            new = torch.where(better, best, current)
            chosen[i : i + 1] = new
            picked[i : i + 1] = candidates.index_select(0, new)
            changed |= better[0]
        if not bool(changed):
            return passes, True
    return passes, False


def _ascent_table(centroids, own, chosen, picked, alpha, beta, eps, max_passes) -> tuple[int, bool]:
    """The same coordinate ascent with a [C, G, C] table of log distances, refreshed lazily.

    table[i, g, j] = log(d(c_{i,g}, picked_j) + eps) (table[i, :, i] = 0) is built once with large
    matmuls; at the visit of class i only the columns j whose choice changed since row i was last
    refreshed are recomputed (a [G, d] x [d, changed] matmul), so a pass costs C * G * d * (number
    of changes in the last C visits) instead of C * G * C * d — passes late in the search, where few
    classes still move, are almost free. Every table entry is a fresh dot product (no running
    updates), so the gains equal the recompute path's up to matmul rounding. Decisions are taken on
    the host (one sync per visit): meant for the CPU. Updates chosen / picked in place.
    """
    num_classes, groups, dim = centroids.shape
    table = torch.empty((num_classes, groups, num_classes), dtype=centroids.dtype, device=centroids.device)
    rows_per_block = max(1, _TABLE_BLOCK_ELEMENTS // (groups * num_classes))
    for start in range(0, num_classes, rows_per_block):
        block = centroids[start : start + rows_per_block]
        table[start : start + block.shape[0]] = _log_distance(
            block.reshape(-1, dim) @ picked.T, eps
        ).view(block.shape[0], groups, num_classes)
    table.diagonal(dim1=0, dim2=2).zero_()  # table[i, :, i] = 0: a class is not its own pair
    change_log: list[int] = []  # classes in the order their choice changed
    refreshed_at = [0] * num_classes  # len(change_log) when row i was last brought up to date
    passes = 0
    for _ in range(max_passes):
        passes += 1
        changed = False
        for i in range(num_classes):
            stale = sorted(set(change_log[refreshed_at[i] :]) - {i})
            if stale:
                columns = torch.tensor(stale, device=centroids.device)
                table[i][:, columns] = _log_distance(centroids[i] @ picked[columns].T, eps)
            refreshed_at[i] = len(change_log)
            gain = alpha * own[i] + beta * table[i].sum(dim=1)  # [G]
            best = int(_first_extreme(gain, largest=True))
            current = int(chosen[i])
            if bool(gain[best] > gain[current]):  # strict: a tie keeps current
                chosen[i] = best
                picked[i] = centroids[i, best]
                change_log.append(i)
                changed = True
        if not changed:
            return passes, True
    return passes, False


def s3_search_centroids(
    centroids: torch.Tensor,
    real_centroids: torch.Tensor,
    *,
    alpha: float = 0.4,
    beta: float = 0.9,
    eps: float = 0.0,
    max_passes: int = 5,
    dtype: torch.dtype = torch.float32,
    method: str = "auto",
) -> S3Result:
    """S³ coordinate ascent on subgroup centroids [C, G, d] and real centroids [C, d] (normalised).

    method: "recompute" (per-visit [G, d] x [d, C] matmul, no host sync: the GPU path), "table"
        (lazily refreshed [C, G, C] log-distance table, host decisions: the CPU path) or "auto" =
        "table" on the CPU when the table fits `TABLE_BYTES`, else "recompute". Both take the same
        decisions in exact arithmetic (they differ only in matmul rounding).
    """
    dtype = _check_dtype(dtype)
    _check_search_settings(alpha, beta, eps, max_passes)
    if method not in SEARCH_METHODS:
        raise IGDSInputError(f"S3 search method must be one of {SEARCH_METHODS}, got {method!r}")
    _check_tensor("centroids", centroids, 3, "[C, G, d]")
    num_classes, groups, dim = centroids.shape
    centroids = centroids.to(dtype).contiguous()
    _check_finite_unit("centroids", centroids)
    real = _check_real_centroids(real_centroids, num_classes, dim, centroids.device, dtype)
    if method == "auto":
        table_bytes = num_classes * groups * num_classes * centroids.element_size()
        method = "table" if centroids.device.type == "cpu" and table_bytes <= TABLE_BYTES else "recompute"

    own, distance_to_real = _own_matrix(centroids, real, eps)  # [C, G] each
    start = _first_extreme(distance_to_real, largest=False)  # [C] closest to the real centroid
    chosen = start.clone()
    picked = centroids[torch.arange(num_classes, device=centroids.device), chosen].clone()  # [C, d]
    ascent = _ascent_table if method == "table" else _ascent_recompute
    passes, converged = ascent(centroids, own, chosen, picked, alpha, beta, eps, max_passes)

    return S3Result(
        chosen=chosen,
        start=start,
        objective=_objective(own, centroids, chosen, alpha, beta, eps),
        start_objective=_objective(own, centroids, start, alpha, beta, eps),
        passes=passes,
        converged=converged,
    )


def s3_search(
    candidate_features: torch.Tensor,
    real_centroids: torch.Tensor,
    *,
    alpha: float = 0.4,
    beta: float = 0.9,
    eps: float = 0.0,
    max_passes: int = 5,
    dtype: torch.dtype = torch.float32,
    method: str = "auto",
) -> S3Result:
    """S³ selection for candidate features [C, G, K, d] (L2-normalised) and real centroids [C, d].

    Everything runs on the features' device (real_centroids must be there too); all inputs are
    checked before the search starts. Returns an `S3Result`.
    """
    _check_search_settings(alpha, beta, eps, max_passes)
    if method not in SEARCH_METHODS:
        raise IGDSInputError(f"S3 search method must be one of {SEARCH_METHODS}, got {method!r}")
    centroids = subgroup_centroids(candidate_features, dtype=dtype)
    return s3_search_centroids(
        centroids, real_centroids, alpha=alpha, beta=beta, eps=eps, max_passes=max_passes, dtype=dtype, method=method
    )


def s3_select(
    candidate_features: torch.Tensor,
    real_centroids: torch.Tensor,
    alpha: float = 0.4,
    beta: float = 0.9,
    eps: float = 0.0,
    max_passes: int = 5,
    *,
    dtype: torch.dtype = torch.float32,
    method: str = "auto",
) -> torch.Tensor:
    """[C] int64 index of the chosen subgroup per class (see `s3_search` for the full result)."""
    return s3_search(
        candidate_features, real_centroids, alpha=alpha, beta=beta, eps=eps, max_passes=max_passes, dtype=dtype,
        method=method,
    ).chosen
