"""S³'s settings (`S3Config`), its results (`S3Objective`, `S3Result`) and the one-line checks of its inputs."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..errors import IGDSInputError
from ..settings import option

LOG_FLOOR = 1e-12  # every log argument d + eps is floored here, so eps = 0 with d = 0 stays finite
NORM_TOLERANCE = 1e-2  # |norm - 1| allowed for "L2-normalised" features (fp16/bf16-stored ones pass)
ZERO_CENTROID_NORM = 1e-6  # a mean of unit vectors shorter than this has no usable direction
COMPUTE_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# configuration and results
# ----------------------------------------------------------------------------------------------


def check_real(name: str, value, minimum: float = 0.0):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IGDSInputError(f"S3 {name} must be a finite number, got {value!r}")
    if value < minimum:
        raise IGDSInputError(f"S3 {name} must be >= {minimum}, got {value!r}")


def check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise IGDSInputError(f"S3 {name} must be an integer >= {minimum}, got {value!r}")


def check_search_settings(alpha, beta, eps, max_passes):
    check_real("alpha", alpha)
    check_real("beta", beta)
    check_real("eps", eps)
    check_int("max_passes", max_passes, 0)


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
        check_int("groups", self.groups, 1)
        check_real("closeness_weight", self.closeness_weight)
        check_real("separation_weight", self.separation_weight)
        check_real("eps", self.eps)
        check_int("max_passes", self.max_passes, 0)
        check_int("real_per_class", self.real_per_class, 1)

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


def check_dtype(dtype) -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise IGDSInputError(f"S3 compute dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def check_tensor(name: str, value, ndim: int, shape_text: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise IGDSInputError(f"{name} must be a torch.Tensor {shape_text}, got {type(value).__name__}")
    if value.ndim != ndim:
        raise IGDSInputError(f"{name} must be {ndim}-D {shape_text}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise IGDSInputError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if any(size < 1 for size in value.shape):
        raise IGDSInputError(f"{name} {shape_text} must have no empty dimension, got shape {tuple(value.shape)}")
    return value


def check_finite_unit(name: str, values: torch.Tensor, offset: int = 0):
    """values [..., d] (already in the compute dtype): finite and L2-normalised, else one-line error.

    `offset` shifts the reported leading index (for chunks of a larger tensor).
    """
    finite = torch.isfinite(values).all(dim=-1)
    if not bool(finite.all()):
        raise IGDSInputError(f"{name} has a non-finite value at index {first_index(~finite, offset)}")
    norms = torch.linalg.vector_norm(values, dim=-1)
    off_unit = (norms - 1).abs() > NORM_TOLERANCE
    if bool(off_unit.any()):
        local = first_index(off_unit)
        raise IGDSInputError(
            f"{name} must be L2-normalised feature vectors; the vector at index "
            f"{first_index(off_unit, offset)} has norm {float(norms[local]):.6g}"
        )


def first_index(mask: torch.Tensor, offset: int = 0) -> tuple:
    first = [int(i) for i in mask.nonzero()[0]]
    first[0] += offset
    return tuple(first)


def check_real_centroids(real_centroids, num_classes: int, dim: int, device, dtype) -> torch.Tensor:
    check_tensor("real_centroids", real_centroids, 2, "[C, d]")
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
    check_finite_unit("real_centroids", real)
    return real


def check_chosen(chosen, num_classes: int, groups: int, device) -> torch.Tensor:
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
