"""S³ subgroup selection (igds_fast.select): the objective, the coordinate ascent, centroids, inputs.

The references here are written straight from the formula in float64 with Python loops: the
objective term by term, the public IMS3 procedure (full objective re-evaluated for every trial
move) and an exhaustive search over all G^C choices. Shapes stay tiny (C <= 6, G <= 5, d <= 32).
"""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igds_fast.errors import IGDSInputError
from igds_fast.select import (
    LOG_FLOOR,
    ClassCentroidAccumulator,
    S3Config,
    class_centroids,
    s3_objective,
    s3_objective_from_centroids,
    s3_search,
    s3_search_centroids,
    s3_select,
    select_real_indices,
    subgroup_centroids,
)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def random_problem(classes, groups, images, dim, spread=1.0, generator=None, dtype=torch.float32):
    """Candidate features [C, G, K, d] clustered around a per-class direction, real centroids [C, d].

    `spread` scales the within-class noise: small = subgroups close to their class, so the own and
    the pair terms pull in different directions and the search has something to decide.
    """
    base = torch.randn(classes, 1, 1, dim, generator=generator, dtype=torch.float64)
    noise = torch.randn(classes, groups, images, dim, generator=generator, dtype=torch.float64)
    features = unit(base + spread * noise)
    real = unit(base[:, 0, 0] + 0.3 * torch.randn(classes, dim, generator=generator, dtype=torch.float64))
    return features.to(dtype), real.to(dtype)


# ---- float64 references, straight from the formula ---------------------------------------------


def direct_centroids(features: torch.Tensor) -> np.ndarray:
    """[C, G, d] normalize(mean over K), numpy float64."""
    x = features.double().numpy()
    mean = x.mean(axis=2)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def log_distance(u: np.ndarray, v: np.ndarray, eps: float) -> float:
    cos = min(1.0, max(-1.0, float(u @ v)))
    return math.log(max(1.0 - cos + eps, LOG_FLOOR))


def direct_objective(centroids: np.ndarray, real: np.ndarray, chosen, alpha, beta, eps):
    """(total, own_term, pair_term) with one Python term per class and per pair i < j."""
    own = sum(-log_distance(centroids[i, g], real[i], eps) for i, g in enumerate(chosen))
    pair = 0.0
    for i in range(len(chosen)):
        for j in range(i + 1, len(chosen)):
            pair += log_distance(centroids[i, chosen[i]], centroids[j, chosen[j]], eps)
    return alpha * own + beta * pair, own, pair


def reference_ascent(centroids, real, alpha, beta, eps, max_passes):
    """The public IMS3 procedure: closest-to-real start, then for each class in order try every other
    subgroup, re-evaluating the whole objective, keeping a strictly better one. Returns the choice,
    the start, the passes run and the smallest |difference| of any comparison made (how near a tie
    the decisions came, to know when float32 must agree)."""
    num_classes, groups, _ = centroids.shape
    start = [int(np.argmin([1 - min(1.0, float(centroids[i, g] @ real[i])) for g in range(groups)]))
             for i in range(num_classes)]
    chosen = list(start)
    best = direct_objective(centroids, real, chosen, alpha, beta, eps)[0]
    margin, passes = math.inf, 0
    for _ in range(max_passes):
        passes += 1
        improved = False
        for i in range(num_classes):
            current, best_g, best_i = chosen[i], chosen[i], best
            for g in range(groups):
                if g == current:
                    continue
                trial = list(chosen)
                trial[i] = g
                value = direct_objective(centroids, real, trial, alpha, beta, eps)[0]
                margin = min(margin, abs(value - best_i))
                if value > best_i:
                    best_i, best_g = value, g
            if best_g != current:
                chosen[i], best, improved = best_g, best_i, True
        if not improved:
            break
    return chosen, start, passes, margin


def all_objectives(centroids, real, alpha, beta, eps):
    """{choice tuple: objective} over all G^C choices."""
    num_classes, groups, _ = centroids.shape
    return {
        choice: direct_objective(centroids, real, choice, alpha, beta, eps)[0]
        for choice in itertools.product(range(groups), repeat=num_classes)
    }


def improving_move_exists(objectives, choice, groups, classes, tolerance=1e-12) -> bool:
    """Whether changing one of `classes` in `choice` strictly raises the objective."""
    value = objectives[choice]
    for i in classes:
        for g in range(groups):
            trial = choice[:i] + (g,) + choice[i + 1 :]
            if objectives[trial] > value + tolerance:
                return True
    return False


SETTINGS = [  # (alpha, beta, eps): the public default, a separation-heavy one, eps > 0, own-only
    (0.4, 0.9, 0.0),
    (0.1, 2.0, 0.0),
    (1.0, 1.0, 1e-6),
    (1.0, 0.0, 0.0),
]


# ---- the objective --------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha,beta,eps", SETTINGS)
def test_objective_matches_direct_float64(rng_seed, alpha, beta, eps):
    generator = torch.Generator().manual_seed(rng_seed)
    features, real = random_problem(5, 3, 4, 16, generator=generator)
    centroids, real64 = direct_centroids(features), real.double().numpy()
    for _ in range(4):
        chosen = torch.randint(0, 3, (5,), generator=generator)
        total, own, pair = direct_objective(centroids, real64, chosen.tolist(), alpha, beta, eps)
        exact = s3_objective(features.double(), real.double(), chosen, alpha=alpha, beta=beta, eps=eps,
                             dtype=torch.float64)
        assert exact.total == pytest.approx(total, rel=1e-12, abs=1e-12)
        assert exact.own_term == pytest.approx(own, rel=1e-12, abs=1e-12)
        assert exact.pair_term == pytest.approx(pair, rel=1e-12, abs=1e-12)
        fast = s3_objective(features, real, chosen, alpha=alpha, beta=beta, eps=eps)  # float32
        assert fast.total == pytest.approx(total, rel=1e-5, abs=1e-5)
        assert fast.own_term == pytest.approx(own, rel=1e-5, abs=1e-5)
        assert fast.pair_term == pytest.approx(pair, rel=1e-5, abs=1e-5)
        from_centroids = s3_objective_from_centroids(subgroup_centroids(features), real, chosen.tolist(),
                                                     alpha=alpha, beta=beta, eps=eps)
        assert from_centroids == fast


def test_objective_pair_term_spans_row_blocks(monkeypatch, rng_seed):
    """More classes than one [rows, C] block: the i < j mask across blocks still counts each pair once."""
    import igds_fast.select as select
    import igds_fast.select.centroids
    import igds_fast.select.search  # noqa: F401 (submodules patched below)

    generator = torch.Generator().manual_seed(rng_seed)
    features, real = random_problem(7, 2, 3, 8, generator=generator, dtype=torch.float64)
    chosen = torch.randint(0, 2, (7,), generator=generator)
    whole = s3_objective(features, real, chosen, dtype=torch.float64)
    monkeypatch.setattr(select.search, "_PAIR_ROWS", 3)
    blocked = s3_objective(features, real, chosen, dtype=torch.float64)
    expected = direct_objective(direct_centroids(features), real.numpy(), chosen.tolist(), 0.4, 0.9, 0.0)
    assert blocked.pair_term == pytest.approx(expected[2], rel=1e-12)
    assert blocked.pair_term == pytest.approx(whole.pair_term, rel=1e-12)


def test_zero_distance_with_zero_eps_is_floored_not_infinite():
    """eps = 0 and a centroid equal to the real one (or two classes' centroids equal): log(0) would be
    -inf (the public code's nan path); here the log argument is floored at LOG_FLOOR."""
    direction = unit(torch.randn(1, 8, dtype=torch.float64))
    other = unit(torch.randn(1, 8, dtype=torch.float64))
    # class 0 and class 1 both have a single subgroup whose images are all `direction`
    features = torch.stack([direction.expand(2, 8), direction.expand(2, 8)])[:, None]  # [2, 1, 2, 8]
    real = torch.cat([direction, other])
    value = s3_objective(features, real, [0, 0], alpha=1.0, beta=1.0, eps=0.0, dtype=torch.float64)
    assert math.isfinite(value.total)
    assert value.pair_term == pytest.approx(math.log(LOG_FLOOR))
    expected_own = -math.log(LOG_FLOOR) - math.log(1 - float(direction[0] @ other[0]))
    assert value.own_term == pytest.approx(expected_own)
    result = s3_search(features, real, eps=0.0, dtype=torch.float64)
    assert math.isfinite(result.objective.total) and result.chosen.tolist() == [0, 0]


# ---- the search -----------------------------------------------------------------------------------


METHODS = ("recompute", "table")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("alpha,beta,eps", SETTINGS)
def test_search_matches_the_public_procedure(rng_seed, alpha, beta, eps, method):
    """Per-row gains give the same decisions as re-evaluating the whole objective every trial."""
    generator = torch.Generator().manual_seed(rng_seed)
    compared32 = 0
    for trial in range(12):
        classes, groups = 2 + trial % 4, 1 + trial % 4
        features, real = random_problem(classes, groups, 3, 12, spread=0.6, generator=generator)
        centroids, real64 = direct_centroids(features), real.double().numpy()
        chosen, start, passes, margin = reference_ascent(centroids, real64, alpha, beta, eps, 5)
        exact = s3_search(features.double(), real.double(), alpha=alpha, beta=beta, eps=eps, dtype=torch.float64,
                          method=method)
        if margin > 1e-9:
            assert exact.chosen.tolist() == chosen
            assert exact.start.tolist() == start
            assert exact.passes == passes
        if margin > 1e-3:  # float32 rounding (~1e-6 here) cannot flip a decision this far from a tie
            fast = s3_search(features, real, alpha=alpha, beta=beta, eps=eps, method=method)
            assert fast.chosen.tolist() == chosen and fast.passes == passes
            compared32 += 1
    assert compared32 >= 3, "almost every random problem came near a tie: the test compared nothing"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("alpha,beta,eps", SETTINGS)
def test_ascent_against_exhaustive_search(rng_seed, alpha, beta, eps, method):
    """Never worse than the start; a local optimum when converged; the exhaustive optimum whenever it
    is reachable from the start by the first pass's single-class moves, i.e. it equals the start,
    or differs from it in one class k while no class visited before k has an improving move."""
    generator = torch.Generator().manual_seed(rng_seed)
    reachable = 0
    for trial in range(16):
        classes, groups = 2 + trial % 3, 2 + (trial // 3) % 3  # C <= 4, G <= 4
        features, real = random_problem(classes, groups, 3, 10, spread=0.7, generator=generator)
        centroids, real64 = direct_centroids(features), real.double().numpy()
        objectives = all_objectives(centroids, real64, alpha, beta, eps)
        best = max(objectives.values())
        result = s3_search(features.double(), real.double(), alpha=alpha, beta=beta, eps=eps,
                           max_passes=10, dtype=torch.float64, method=method)
        chosen, start = tuple(result.chosen.tolist()), tuple(result.start.tolist())
        assert result.objective.total == pytest.approx(objectives[chosen], rel=1e-12, abs=1e-12)
        assert result.start_objective.total == pytest.approx(objectives[start], rel=1e-12, abs=1e-12)
        assert objectives[chosen] >= objectives[start] - 1e-12
        if result.converged:
            assert not improving_move_exists(objectives, chosen, groups, range(classes))
        optima = [choice for choice, value in objectives.items() if value >= best - 1e-12]
        for optimum in optima:
            differing = [i for i in range(classes) if optimum[i] != start[i]]
            if not differing or (
                len(differing) == 1 and not improving_move_exists(objectives, start, groups, range(differing[0]))
            ):
                assert objectives[chosen] == pytest.approx(best, rel=1e-12, abs=1e-12)
                reachable += 1
                break
        # float32 never does worse than its own start either (up to rounding of the sums)
        fast = s3_search(features, real, alpha=alpha, beta=beta, eps=eps, method=method)
        assert fast.objective.total >= fast.start_objective.total - 1e-4 * (1 + abs(fast.start_objective.total))
    assert reachable >= 2, "the reachable-optimum condition never held: the test checked nothing"


@pytest.mark.parametrize("method", METHODS)
def test_planted_subgroups_are_found(rng_seed, method):
    """One subgroup per class sits on its real centroid; the others sit between the classes."""
    generator = torch.Generator().manual_seed(rng_seed)
    classes, groups, images, dim = 6, 5, 4, 32
    real = unit(torch.randn(classes, dim, generator=generator))
    # decoys: near the mean of all classes (close to every other class, further from their own)
    decoy_center = unit(real.mean(0, keepdim=True) + 0.2 * real)  # [C, d]
    features = unit(decoy_center[:, None, None] + 0.3 * torch.randn(classes, groups, images, dim, generator=generator))
    planted = torch.randint(0, groups, (classes,), generator=generator)
    near = unit(real[:, None] + 0.05 * torch.randn(classes, images, dim, generator=generator))
    features[torch.arange(classes), planted] = near
    result = s3_search(features, real, method=method)
    assert result.chosen.tolist() == planted.tolist()
    assert result.converged
    assert s3_select(features, real, method=method).tolist() == planted.tolist()


def test_separation_term_moves_the_choice():
    """Closest-to-real loses when it sits on another class: the pair term must move it (beta > 0) and
    must not when beta = 0 — so the ascent is really doing something beyond its start."""
    e = torch.eye(4, dtype=torch.float64)
    real = unit(torch.stack([e[0], e[1]]))
    # class 0: subgroup 0 nearest its real centroid but almost on class 1's choice; subgroup 1 a bit
    # further from its real centroid but well separated. Class 1 has one subgroup on e1.
    sub00 = unit(e[0] + 0.9 * e[1])
    sub01 = unit(e[0] - 0.8 * e[1] + 0.5 * e[2])
    features = torch.zeros(2, 2, 1, 4, dtype=torch.float64)
    features[0, 0, 0], features[0, 1, 0] = sub00, sub01
    features[1, 0, 0] = features[1, 1, 0] = e[1]
    separated = s3_search(features, real, alpha=0.4, beta=0.9, dtype=torch.float64)
    assert separated.start.tolist() == [0, 0] and separated.chosen.tolist() == [1, 0]
    assert separated.objective.total > separated.start_objective.total
    own_only = s3_search(features, real, alpha=1.0, beta=0.0, dtype=torch.float64)
    assert own_only.chosen.tolist() == [0, 0] and own_only.passes == 1 and own_only.converged


@pytest.mark.parametrize("method", METHODS)
def test_ties_break_to_the_lowest_index_and_keep_the_current_choice(method):
    """Identical subgroups: the start is subgroup 0 and no move is strictly better."""
    features, real = random_problem(3, 1, 2, 8, generator=torch.Generator().manual_seed(3))
    features = features.expand(3, 4, 2, 8).contiguous()  # every class: 4 copies of one subgroup
    result = s3_search(features, real, method=method)
    assert result.start.tolist() == [0, 0, 0] and result.chosen.tolist() == [0, 0, 0]
    assert result.passes == 1 and result.converged


@pytest.mark.parametrize("method", METHODS)
def test_a_tie_that_appears_later_keeps_the_current_choice(method):
    """Class 0's subgroups 0 and 2 are mirror images in a coordinate that, once class 1 has moved,
    no other vector has: from then on they tie exactly, and the search must stay at 2 (strictly
    better only), not jump back to the lower index 0."""
    e = torch.eye(4, dtype=torch.float64)
    x0, x2 = unit(e[0] + 0.5 * e[1] + 0.3 * e[3]), unit(e[0] + 0.5 * e[1] - 0.3 * e[3])
    class0 = [x0, unit(e[0] + 2 * e[1]), x2]
    class1 = [unit(e[1] + 0.6 * e[3]), e[2], unit(e[1] + e[0])]
    features = torch.stack([torch.stack(class0), torch.stack(class1)])[:, :, None]  # [2, 3, 1, 4]
    real = torch.stack([e[0], e[1]])
    result = s3_search(features, real, alpha=0.1, beta=2.0, dtype=torch.float64, method=method)
    assert result.start.tolist() == [0, 0]
    assert result.chosen.tolist() == [2, 1] and result.passes == 2 and result.converged
    objective = s3_objective(features, real, [2, 1], alpha=0.1, beta=2.0, dtype=torch.float64)
    assert objective.total == s3_objective(features, real, [0, 1], alpha=0.1, beta=2.0, dtype=torch.float64).total


@pytest.mark.parametrize("method", METHODS)
def test_max_passes_bounds_the_search(rng_seed, method):
    features, real = random_problem(4, 3, 2, 8, spread=0.7, generator=torch.Generator().manual_seed(rng_seed))
    none = s3_search(features, real, max_passes=0, method=method)
    assert none.passes == 0 and not none.converged and torch.equal(none.chosen, none.start)
    one = s3_search(features, real, max_passes=1, method=method)
    assert one.passes == 1
    many = s3_search(features, real, max_passes=50, method=method)
    assert many.converged and many.passes <= 50


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_and_independent_of_chunking(rng_seed, method):
    generator = torch.Generator().manual_seed(rng_seed)
    features, real = random_problem(6, 4, 3, 16, spread=0.6, generator=generator)
    first = s3_search(features, real, method=method)
    for _ in range(2):
        again = s3_search(features, real, method=method)
        assert torch.equal(again.chosen, first.chosen) and torch.equal(again.start, first.start)
        assert again.objective == first.objective and again.passes == first.passes
    assert first.chosen.dtype == torch.int64 and tuple(first.chosen.shape) == (6,)
    whole = subgroup_centroids(features)
    for chunk in (1, 4):
        assert torch.equal(subgroup_centroids(features, classes_per_chunk=chunk), whole)
    assert torch.equal(s3_search_centroids(whole, real, method=method).chosen, first.chosen)
    # a bfloat16-stored input is converted chunk by chunk and matches converting it whole
    half = features.to(torch.bfloat16)
    assert torch.equal(subgroup_centroids(half, classes_per_chunk=2), subgroup_centroids(half.float()))


def test_subgroup_centroids_are_normalised_means(rng_seed):
    features, _ = random_problem(3, 2, 5, 8, generator=torch.Generator().manual_seed(rng_seed), dtype=torch.float64)
    got = subgroup_centroids(features, dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), direct_centroids(features), rtol=1e-13, atol=1e-14)


def test_table_method_with_many_changes_and_blocked_build(monkeypatch, rng_seed):
    """The table is built in row blocks and refreshed column by column: at a size where many classes
    move, it takes the reference's decisions, like the recompute path (away from near-ties)."""
    import igds_fast.select as select
    import igds_fast.select.centroids
    import igds_fast.select.search  # noqa: F401 (submodules patched below)

    monkeypatch.setattr(select.search, "_TABLE_BLOCK_ELEMENTS", 7)  # one class per block
    generator = torch.Generator().manual_seed(rng_seed)
    features, real = random_problem(9, 4, 3, 12, spread=1.2, generator=generator, dtype=torch.float64)
    centroids = direct_centroids(features)
    chosen, _, passes, margin = reference_ascent(centroids, real.numpy(), 0.1, 2.0, 0.0, 5)
    table = s3_search(features, real, alpha=0.1, beta=2.0, dtype=torch.float64, method="table")
    recompute = s3_search(features, real, alpha=0.1, beta=2.0, dtype=torch.float64, method="recompute")
    if margin > 1e-9:
        assert table.chosen.tolist() == chosen == recompute.chosen.tolist()
        assert table.passes == passes == recompute.passes
        assert table.objective.total == pytest.approx(recompute.objective.total, rel=1e-12)


def test_auto_method_picks_by_device_and_size(monkeypatch):
    import igds_fast.select as select
    import igds_fast.select.centroids
    import igds_fast.select.search  # noqa: F401 (submodules patched below)

    features, real = random_problem(5, 3, 2, 8, spread=0.7, generator=torch.Generator().manual_seed(5))
    calls = []
    for name in ("_ascent_table", "_ascent_recompute"):
        original = getattr(select.search, name)
        monkeypatch.setattr(select.search, name, lambda *args, _o=original, _n=name: calls.append(_n) or _o(*args))
    s3_search(features, real)
    monkeypatch.setattr(select.search, "TABLE_BYTES", 0)
    s3_search(features, real)
    assert calls == ["_ascent_table", "_ascent_recompute"]


# ---- real centroids -------------------------------------------------------------------------------


def test_class_centroids_stream_equals_one_shot(rng_seed, monkeypatch):
    generator = torch.Generator().manual_seed(rng_seed)
    features = unit(torch.randn(50, 12, generator=generator))
    labels = torch.randint(0, 4, (50,), generator=generator)
    labels[:4] = torch.arange(4)  # every class present
    whole = class_centroids(features, labels, 4, dtype=torch.float64)
    expected = [unit(features[labels == c].double().mean(0)).numpy() for c in range(4)]
    np.testing.assert_allclose(whole.numpy(), np.stack(expected), rtol=1e-12, atol=1e-13)
    import igds_fast.select as select
    import igds_fast.select.centroids
    import igds_fast.select.search  # noqa: F401 (submodules patched below)

    monkeypatch.setattr(select.centroids, "_CENTROID_BATCH", 9)  # class_centroids itself in 6 batches
    np.testing.assert_allclose(class_centroids(features, labels, 4, dtype=torch.float64).numpy(), whole.numpy(),
                               rtol=1e-12, atol=1e-13)
    accumulator = ClassCentroidAccumulator(4, 12)
    for start in range(0, 50, 7):
        accumulator.add(features[start : start + 7], labels[start : start + 7])
    np.testing.assert_allclose(accumulator.centroids(torch.float64).numpy(), whole.numpy(), rtol=1e-12, atol=1e-13)
    assert accumulator.counts.tolist() == torch.bincount(labels, minlength=4).tolist()
    assert accumulator.centroids().dtype == torch.float32


def test_class_centroid_cap_keeps_the_first_images_seen(rng_seed):
    generator = torch.Generator().manual_seed(rng_seed)
    features = unit(torch.randn(40, 6, generator=generator, dtype=torch.float64))
    labels = torch.randint(0, 3, (40,), generator=generator)
    labels[:3] = torch.arange(3)
    accumulator = ClassCentroidAccumulator(3, 6, max_per_class=4)
    for start in range(0, 40, 6):
        accumulator.add(features[start : start + 6], labels[start : start + 6])
    expected = []
    for c in range(3):
        members = (labels == c).nonzero().flatten()[:4]
        expected.append(unit(features[members].mean(0)).numpy())
    assert accumulator.counts.tolist() == [min(4, int((labels == c).sum())) for c in range(3)]
    np.testing.assert_allclose(accumulator.centroids(torch.float64).numpy(), np.stack(expected), rtol=1e-12)


def test_select_real_indices_draws_per_class_with_a_seed():
    labels = torch.tensor([0] * 30 + [1] * 3 + [2] * 12)[torch.randperm(45, generator=torch.Generator().manual_seed(1))]
    picked = select_real_indices(labels, 3, per_class=5, seed=7)
    assert torch.equal(picked, select_real_indices(labels, 3, per_class=5, seed=7))
    assert torch.equal(picked, torch.sort(picked).values) and picked.unique().numel() == picked.numel()
    assert torch.bincount(labels[picked], minlength=3).tolist() == [5, 3, 5]
    others = [select_real_indices(labels, 3, per_class=5, seed=s) for s in range(8, 12)]
    assert any(not torch.equal(picked, other) for other in others)


def test_missing_real_class_is_refused():
    accumulator = ClassCentroidAccumulator(3, 4)
    accumulator.add(unit(torch.randn(5, 4)), torch.tensor([0, 0, 2, 2, 0]))
    with pytest.raises(IGDSInputError, match="1 classes have no real features: 1"):
        accumulator.centroids()


# ---- bad inputs -----------------------------------------------------------------------------------


def one_line_error(call, match):
    with pytest.raises(IGDSInputError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_bad_inputs_give_one_line_errors():
    features, real = random_problem(3, 2, 2, 8, generator=torch.Generator().manual_seed(0))
    one_line_error(lambda: s3_select(features[:, :0], real), "no empty dimension")  # G = 0
    one_line_error(lambda: s3_select(features[0], real), "4-D")
    one_line_error(lambda: s3_select(features.tolist(), real), "torch.Tensor")
    one_line_error(lambda: s3_select(features.to(torch.int64), real), "floating-point")
    one_line_error(lambda: s3_select(features, real[:2]), r"\[3, 8\]")
    one_line_error(lambda: s3_select(features, real[:, :4]), r"\[3, 8\]")
    one_line_error(lambda: s3_select(features, real[None]), "2-D")
    nan = features.clone()
    nan[1, 0, 1, 3] = float("nan")
    one_line_error(lambda: s3_select(nan, real), r"candidate_features has a non-finite value at index \(1, 0, 1\)")
    inf = features.clone()
    inf[2, 1, 0, 0] = float("inf")
    one_line_error(lambda: s3_select(inf, real), "non-finite")
    one_line_error(lambda: s3_select(features * 3, real), "L2-normalised")
    bad_real = real.clone()
    bad_real[0, 0] = float("nan")
    one_line_error(lambda: s3_select(features, bad_real), "real_centroids has a non-finite value")
    one_line_error(lambda: s3_select(features, real * 0.5), "real_centroids must be L2-normalised")
    cancelling = features.clone()
    cancelling[0, 1, 1] = -cancelling[0, 1, 0]
    one_line_error(lambda: s3_select(cancelling, real), "subgroup 1 of class 0 averages to the zero vector")
    one_line_error(lambda: s3_select(features, real, alpha=-1.0), "alpha must be >= 0")
    one_line_error(lambda: s3_select(features, real, beta=float("nan")), "beta must be a finite number")
    one_line_error(lambda: s3_select(features, real, eps=-1e-3), "eps must be >= 0")
    one_line_error(lambda: s3_select(features, real, max_passes=-1), "max_passes")
    one_line_error(lambda: s3_select(features, real, max_passes=True), "max_passes")
    one_line_error(lambda: s3_select(features, real, dtype=torch.float16), "compute dtype")
    one_line_error(lambda: s3_select(features, real, method="fast"), "search method")
    one_line_error(lambda: s3_objective(features, real, [0, 2, 0]), r"\[0, 2\)")
    one_line_error(lambda: s3_objective(features, real, [0, 1]), r"\[C\] = \[3\]")
    one_line_error(lambda: s3_objective(features, real, torch.zeros(3)), "integer subgroup indices")
    one_line_error(lambda: ClassCentroidAccumulator(2, 8).add(features[0, 0], torch.tensor([0, 2])), r"\[0, 2\)")
    one_line_error(lambda: ClassCentroidAccumulator(2, 8).add(features[0, 0], torch.tensor([0])), "labels must be")
    one_line_error(lambda: ClassCentroidAccumulator(2, 4).add(features[0, 0], torch.tensor([0, 1])), r"\[B, 4\]")


def test_config_is_validated():
    config = S3Config()
    assert config.search_kwargs() == {"alpha": 0.4, "beta": 0.9, "eps": 0.0, "max_passes": 5}
    assert config.to_dict()["groups"] == 5 and config.real_per_class == 200
    for bad in ({"groups": 0}, {"groups": 2.0}, {"closeness_weight": -0.1},
                {"separation_weight": float("inf")}, {"eps": -1.0}, {"max_passes": -1}, {"real_per_class": 0},
                {"closeness_weight": "0.4"}):
        one_line_error(lambda bad=bad: S3Config(**bad), "S3 ")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(rng_seed):
    """On the device the search takes the same decisions as on the CPU (away from ties)."""
    generator = torch.Generator().manual_seed(rng_seed)
    features, real = random_problem(64, 8, 4, 128, spread=0.6, generator=generator, dtype=torch.float64)
    cpu = s3_search(features, real, dtype=torch.float64, method="table")
    cuda = s3_search(features.cuda(), real.cuda(), dtype=torch.float64)
    assert cuda.chosen.device.type == "cuda"
    assert torch.equal(cuda.chosen.cpu(), cpu.chosen) and cuda.passes == cpu.passes
    assert cuda.objective.total == pytest.approx(cpu.objective.total, rel=1e-10)
