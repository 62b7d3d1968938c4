"""Selective Subgroup Sampling (S³, IMS3, CVPR 2026): per class, keep the best of G generated subgroups.

config.py (S3Config, results, input checks), centroids.py (subgroup and class centroids, the real
draw), search.py (the objective, the coordinate ascent).

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
from .centroids import ClassCentroidAccumulator, class_centroids, select_real_indices, subgroup_centroids
from .config import COMPUTE_DTYPES, LOG_FLOOR, NORM_TOLERANCE, S3Config, S3Objective, S3Result
from .search import SEARCH_METHODS, TABLE_BYTES, s3_objective, s3_objective_from_centroids, s3_search, s3_search_centroids, s3_select

__all__ = [
    "COMPUTE_DTYPES",
    "ClassCentroidAccumulator",
    "LOG_FLOOR",
    "NORM_TOLERANCE",
    "S3Config",
    "S3Objective",
    "S3Result",
    "SEARCH_METHODS",
    "TABLE_BYTES",
    "class_centroids",
    "s3_objective",
    "s3_objective_from_centroids",
    "s3_search",
    "s3_search_centroids",
    "s3_select",
    "select_real_indices",
    "subgroup_centroids",
]
