"""S³'s objective and its coordinate-ascent search (the "table" and "recompute" methods)."""
from __future__ import annotations


import torch

from ..errors import IGDSInputError
from .centroids import subgroup_centroids
from .config import (LOG_FLOOR, S3Objective, S3Result, check_chosen, check_dtype, check_finite_unit,
                     check_real_centroids, check_search_settings, check_tensor)

_PAIR_ROWS = 1024  # rows of the [rows, C] cosine block when summing the pair term (bounded memory)
SEARCH_METHODS = ("auto", "recompute", "table")
TABLE_BYTES = 512 << 20  # "auto" uses the [C, G, C] table on the CPU up to this size (C=1000, G=20: 80 MB)
_TABLE_BLOCK_ELEMENTS = 1 << 22  # the table is built [rows * G, C] <= 4M entries at a time


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
    dtype = check_dtype(dtype)
    check_search_settings(alpha, beta, eps, 0)
    check_tensor("centroids", centroids, 3, "[C, G, d]")
    num_classes, groups, dim = centroids.shape
    centroids = centroids.to(dtype)
    check_finite_unit("centroids", centroids)
    real = check_real_centroids(real_centroids, num_classes, dim, centroids.device, dtype)
    chosen = check_chosen(chosen, num_classes, groups, centroids.device)
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
    check_search_settings(alpha, beta, eps, 0)
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
    dtype = check_dtype(dtype)
    check_search_settings(alpha, beta, eps, max_passes)
    if method not in SEARCH_METHODS:
        raise IGDSInputError(f"S3 search method must be one of {SEARCH_METHODS}, got {method!r}")
    check_tensor("centroids", centroids, 3, "[C, G, d]")
    num_classes, groups, dim = centroids.shape
    centroids = centroids.to(dtype).contiguous()
    check_finite_unit("centroids", centroids)
    real = check_real_centroids(real_centroids, num_classes, dim, centroids.device, dtype)
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
    check_search_settings(alpha, beta, eps, max_passes)
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
