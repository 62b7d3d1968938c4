"""beta calibration: weighted sampling without replacement, determinism, table choice, file round trip, errors."""
from __future__ import annotations

import json
import math
from itertools import permutations

import pytest
import torch

from igds_fast.calibrate import (
    best_beta,
    calibrate_beta,
    draw_subset,
    gumbel_noise,
    normalize_scores,
    score_samples,
    selection_probabilities,
)
from igds_fast.guidance.beta_table import beta_for_ipc, read_beta_table, write_beta_table
from igds_fast import cli
from igds_fast.cli.calibrate import run as run_calibrate
from igds_fast.data import load_digits_split
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.augment import AugmentConfig
from igds_fast.train_ve import VETrainConfig, train_ve


def _draw_counts(scores, beta, ipc, draws, seed):
    """How often each ordered IPC-tuple of indices is drawn from one class (Gumbel noise per draw)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(scores.numel(), dtype=torch.long)
    counts = {}
    for _ in range(draws):
        picked = tuple(draw_subset(scores, labels, ipc, beta, gumbel_noise(scores.numel(), generator), 1).tolist())
        counts[picked] = counts.get(picked, 0) + 1
    return counts


def test_beta_zero_draws_uniformly(rng_seed):
    scores = torch.rand(6, dtype=torch.float64) * 3 + 0.1  # distinct, non-zero scores
    draws = 3000
    counts = _draw_counts(scores, 0.0, 1, draws, rng_seed)
    frequencies = torch.tensor([counts.get((i,), 0) / draws for i in range(6)])
    # Binomial std of a frequency at p = 1/6 over 3000 draws is 0.0068; 0.04 is ~6 sigma.
    assert torch.allclose(frequencies, torch.full((6,), 1 / 6, dtype=frequencies.dtype), atol=0.04)
    assert torch.allclose(selection_probabilities(scores, 0.0), torch.full((6,), 1 / 6, dtype=torch.float64))


def test_draw_probabilities_follow_exp_beta_score_without_replacement(rng_seed):
    """Ordered pairs (i, j) must come out with the successive-sampling probability
    p_i * p_j / (1 - p_i), p = softmax(beta * s): the first draw follows exp(beta s), the second
    the same weights renormalised over the images not drawn yet."""
    scores = torch.tensor([0.2, 0.9, 1.7, 3.1], dtype=torch.float64)
    beta = 0.8
    p = selection_probabilities(scores, beta)
    assert torch.allclose(p, torch.exp(beta * scores) / torch.exp(beta * scores).sum())
    draws = 6000
    counts = _draw_counts(scores, beta, 2, draws, rng_seed)
    assert all(len(set(pair)) == 2 for pair in counts), "an image was drawn twice"
    for i, j in permutations(range(4), 2):
        expected = float(p[i] * p[j] / (1 - p[i]))
        observed = counts.get((i, j), 0) / draws
        sigma = math.sqrt(expected * (1 - expected) / draws)
        assert abs(observed - expected) < 5 * sigma + 1e-3, (i, j, observed, expected)


def test_large_beta_takes_the_highest_scores_per_class(rng_seed):
    generator = torch.Generator().manual_seed(rng_seed)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    scores = torch.rand(15, generator=generator, dtype=torch.float64)
    picked = draw_subset(scores, labels, 2, 1e6, gumbel_noise(15, generator), 3)
    assert labels[picked].tolist() == [0, 0, 1, 1, 2, 2]
    for label in range(3):
        members = torch.nonzero(labels == label).flatten()
        best_two = members[torch.argsort(scores[members], descending=True)[:2]]
        assert picked[2 * label:2 * label + 2].tolist() == best_two.tolist()
    # Negative beta favours the images closest to their centroid (lowest scores).
    picked_low = draw_subset(scores, labels, 1, -1e6, gumbel_noise(15, generator), 3)
    for label in range(3):
        members = torch.nonzero(labels == label).flatten()
        assert int(picked_low[label]) == int(members[torch.argmin(scores[members])])


def test_standardized_scores_are_zscores_within_each_class(rng_seed):
    generator = torch.Generator().manual_seed(rng_seed)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    scores = torch.rand(7, generator=generator, dtype=torch.float64) * torch.tensor([1, 1, 1, 9, 9, 9, 9.0])
    z = normalize_scores(scores, labels, "standardize")
    for label in (0, 1):
        values = z[labels == label]
        assert abs(float(values.mean())) < 1e-12 and abs(float(values.std(unbiased=False)) - 1) < 1e-12
    assert torch.equal(normalize_scores(scores, labels, "none"), scores)


def test_best_beta_is_the_argmax_with_ties_to_the_smaller_beta():
    rows = [
        {"ipc": 1, "beta": 1.0, "mean": 50.0},
        {"ipc": 1, "beta": 0.0, "mean": 52.5},
        {"ipc": 1, "beta": 0.1, "mean": 52.5},
        {"ipc": 10, "beta": 0.0, "mean": 60.0},
        {"ipc": 10, "beta": 0.1, "mean": 61.0},
        {"ipc": 10, "beta": 1.0, "mean": 64.0},
    ]
    assert best_beta(rows, 1) == 0.0
    assert best_beta(rows, 10) == 1.0


# ---- end to end on digits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_ve():
    """A VE on digits: random ResNet-18 trunk (epochs=0) + a fitted linear classifier (~3 s)."""
    train_x, train_y, test_x, test_y = load_digits_split(image_size=16)
    config = VETrainConfig(arch="resnet18", in_channels=1, resolution=16, epochs=0, classifier_epochs=50, seed=0)
    ve, _ = train_ve(train_x, train_y, [str(d) for d in range(10)], config, log=lambda message: None)
    return ve, train_x, train_y, test_x, test_y


def tiny_network():
    """A small conv net (fast on CPU): conv -> ReLU -> pool -> linear."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(4), torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    )


def _greedy_beta(scores, labels):
    """A beta so large that beta * (gap between any two distinct scores of a class) exceeds the
    range of double-precision Gumbel noise (< 44): the draw is then the top-IPC by score."""
    gaps = []
    for label in labels.unique():
        values = torch.unique(scores[labels == label])
        gaps.append((values[1:] - values[:-1]).min())
    return 100.0 / float(torch.stack(gaps).min())


def _calibrate(digits_ve, seed, **overrides):
    ve, train_x, train_y, test_x, test_y = digits_ve
    settings = dict(ipcs=[1, 3], betas=[0.0, 2.0], network=tiny_network, epochs=3, seeds=2, seed=seed,
                    log=lambda message: None, augment=AugmentConfig(horizontal_flip=False), device="cpu")
    settings.update(overrides)
    return calibrate_beta(train_x, train_y, test_x[:200], test_y[:200], ve, **settings)


def test_without_a_device_scoring_and_evaluation_share_the_default_device(digits_ve, monkeypatch):
    import igds_fast.calibrate as calibrate
    import igds_fast.devices as devices

    chosen = torch.device("cpu", 0)  # stands for "cuda when available"; the loaded VE sits on plain cpu
    monkeypatch.setattr(devices, "default_device", lambda: chosen)
    seen = []

    def recording_score(ve, images, labels, device=None):
        seen.append(device)
        raise RuntimeError("stop after scoring")

    monkeypatch.setattr(calibrate, "score_samples", recording_score)
    with pytest.raises(RuntimeError, match="stop after scoring"):
        _calibrate(digits_ve, seed=0, device=None)
    assert seen == [chosen]


def test_calibration_table_choice_and_determinism(digits_ve):
    ve, train_x, train_y, _, _ = digits_ve
    scored = score_samples(ve, train_x, train_y)
    greedy = _greedy_beta(scored["scores"][scored["correct"]], train_y[scored["correct"]])
    grid = [0.0, 2.0, greedy]
    first = _calibrate(digits_ve, seed=3, betas=grid)
    again = _calibrate(digits_ve, seed=3, betas=grid)
    other = _calibrate(digits_ve, seed=4, seeds=1, betas=[0.0])

    assert first["subsets"] == again["subsets"]
    assert [r["accuracies"] for r in first["table"]] == [r["accuracies"] for r in again["table"]]
    assert first["subsets"][3][0.0][0] != other["subsets"][3][0.0][0]

    assert {(r["ipc"], r["beta"]) for r in first["table"]} == {(i, b) for i in (1, 3) for b in grid}
    for ipc in (1, 3):
        rows = [r for r in first["table"] if r["ipc"] == ipc]
        best = max(r["mean"] for r in rows)
        assert first["chosen"][ipc] == min(r["beta"] for r in rows if r["mean"] == best)

    for ipc in (1, 3):
        for beta, per_seed in first["subsets"][ipc].items():
            for indices in per_seed:
                chosen = torch.tensor(indices)
                assert len(set(indices)) == len(indices) == 10 * ipc
                assert torch.equal(torch.bincount(train_y[chosen], minlength=10), torch.full((10,), ipc))
                assert bool(scored["correct"][chosen].all()), "a misclassified image was drawn"
        # The greedy beta takes each class's highest-KL correctly classified images.
        correct = torch.nonzero(scored["correct"]).flatten()
        for indices in first["subsets"][ipc][greedy]:
            for label in range(10):
                members = correct[train_y[correct] == label]
                top = set(members[torch.argsort(scored["scores"][members], descending=True)[:ipc]].tolist())
                assert top == {i for i in indices if int(train_y[i]) == label}
        high = next(r for r in first["table"] if r["ipc"] == ipc and r["beta"] == greedy)
        uniform = next(r for r in first["table"] if r["ipc"] == ipc and r["beta"] == 0.0)
        assert high["mean_score"] > uniform["mean_score"]


def test_beta_table_round_trip_and_lookup(tmp_path):
    result = {
        "chosen": {1: 0.0, 10: 0.1, 50: 1.0},
        "table": [{"ipc": 1, "beta": 0.0, "mean": 40.0, "std": 0.0, "accuracies": [40.0]}],
        "settings": {"network": "convnet3"},
        "subsets": {1: {0.0: [[1, 2]]}},
    }
    path = tmp_path / "beta.json"
    write_beta_table(path, result)
    document = json.loads(path.read_text())
    assert document["beta_per_ipc"] == {"1": 0.0, "10": 0.1, "50": 1.0}
    assert document["table"] == result["table"] and document["settings"] == result["settings"]
    assert "subsets" not in document
    table = read_beta_table(path)
    assert table == {1: 0.0, 10: 0.1, 50: 1.0}

    notes = []
    assert beta_for_ipc(table, 10, log=notes.append) == 0.1 and notes == []
    assert beta_for_ipc(table, 20, log=notes.append) == 0.1
    assert len(notes) == 1 and "IPC 10" in notes[0] and "20" in notes[0]
    assert beta_for_ipc(table, 500, log=notes.append) == 1.0
    with pytest.raises(IGDSInputError, match="no entry for IPC 0|positive integer"):
        beta_for_ipc(table, 0)
    only_large = {10: 0.5}
    with pytest.raises(IGDSInputError, match="IPC 5") as info:
        beta_for_ipc(only_large, 5)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"table": []}', "no 'beta_per_ipc'"),
        ('{"beta_per_ipc": {}}', "non-empty"),
        ('{"beta_per_ipc": {"ten": 0.1}}', "not an integer"),
        ('{"beta_per_ipc": {"0": 0.1}}', "positive integer"),
        ('{"beta_per_ipc": {"1": "high"}}', "finite number"),
        ('{"beta_per_ipc": {"1": NaN}}', "finite number"),
    ],
)
def test_read_beta_table_errors(tmp_path, content, message):
    path = tmp_path / "beta.json"
    path.write_text(content)
    with pytest.raises(IGDSInputError, match=message) as info:
        read_beta_table(path)
    assert "\n" not in str(info.value)
    with pytest.raises(IGDSInputError, match="not found"):
        read_beta_table(tmp_path / "missing.json")


def _no_training():
    raise AssertionError("a network was built: the error must come before any training")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(betas=[]), "beta grid is empty"),
        (dict(betas="0,abc"), "comma-separated numbers"),
        (dict(betas=[0.0, float("inf")]), "finite"),
        (dict(ipcs=[0, 1]), "positive integer"),
        (dict(ipcs=[-3]), "positive integer"),
        (dict(ipcs=[]), "no IPC"),
        (dict(ipcs=[1, 100000]), r"IPC 100000 needs 100000 correctly classified .* class '\d' has only \d+ \(of \d+"),
        (dict(seeds=0), "seeds"),
    ],
)
def test_calibration_input_errors_come_before_training(digits_ve, overrides, message):
    with pytest.raises(IGDSInputError, match=message) as info:
        _calibrate(digits_ve, seed=0, network=_no_training, **overrides)
    assert "\n" not in str(info.value)


def test_ipc_error_names_the_short_class(digits_ve):
    """One class with too few correctly classified images: the message names it and its counts."""
    ve, train_x, train_y, test_x, test_y = digits_ve
    keep = torch.ones_like(train_y, dtype=torch.bool)
    sevens = torch.nonzero(train_y == 7).flatten()
    keep[sevens[4:]] = False  # 4 images of class '7' left
    with pytest.raises(IGDSInputError, match=r"class '7' has only [0-4] \(of 4;") as info:
        calibrate_beta(train_x[keep], train_y[keep], test_x, test_y, ve, [5], [0.0], network=_no_training, log=lambda m: None)
    assert "\n" not in str(info.value)


def test_calibrate_cli(tmp_path, digits_ve, capsys):
    """The CLI hook: folders in, beta table out, readable by read_beta_table."""
    from igds_fast.imageio import save_png_atomic

    ve, train_x, train_y, test_x, test_y = digits_ve
    ve_path = tmp_path / "ve.safetensors"
    ve.save(ve_path)
    for root, images, labels, per_class in (("train", train_x, train_y, 12), ("val", test_x, test_y, 4)):
        for label in range(10):
            folder = tmp_path / root / str(label)
            folder.mkdir(parents=True)
            for k, index in enumerate(torch.nonzero(labels == label).flatten()[:per_class].tolist()):
                save_png_atomic(folder / f"{k}.png", images[index])
    out = tmp_path / "beta.json"
    args = cli.parse([
        "calibrate-beta", "--data", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--ve", str(ve_path),
        "--ipc", "1,2", "--betas", "0,1", "--out", str(out), "--epochs", "2", "--width", "8", "--no-flip", "--quiet",
    ])
    assert args.handler is run_calibrate
    assert args.handler(args) == 0
    table = read_beta_table(out)
    assert set(table) == {1, 2} and set(table.values()) <= {0.0, 1.0}
    document = json.loads(out.read_text())
    assert len(document["table"]) == 4 and document["settings"]["network"] == "convnet3"
    assert document["settings"]["command"]["calibration"]["ipcs"] == [1, 2]
    assert "IPC 1: beta" in capsys.readouterr().out
