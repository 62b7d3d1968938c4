"""train-ve's classifier stage in memory independent of N (issue 28): the streamed probe against the
full-batch reference, its rounds and saved state, the feature store, the report's statistics, the
stage's resume after an interruption at every kind of save, and flat peak memory in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import igds_fast.train_ve.classifier_stage as stage_module
import igds_fast.train_ve.linear_probe as probe_module
from igds_fast.data import TensorImages
from igds_fast.errors import IGDSInputError
from igds_fast.guidance.objective import contextual_kl
from igds_fast.train_ve import (FeatureMoments, FeatureRows, SplitStatistics, StreamedLinearProbe, VETrainConfig,
                                extract_features, fit_linear_classifier, label_entropy, prototype_information,
                                stage_files, train_ve, train_ve_from_source)
from igds_fast.ve import compute_log_centroids
from tolerances import PROBE_TOLERANCES

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = dict(log=lambda message: None)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problem(count: int, dim: int, classes: int, seed: int):
    """Softplus-like features (non-negative, coordinate offsets and scales), labels correlated with them."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (count,), generator=generator)
    centres = torch.randn(classes, dim, generator=generator)
    noise = torch.randn(count, dim, generator=generator)
    scale = torch.rand(dim, generator=generator) * 2 + 0.1
    features = F.softplus(centres[labels] * 0.7 + noise) * scale + torch.rand(dim, generator=generator) * 3
    return features, labels


def _chunks(features, labels, rows):
    def gen():
        for start in range(0, features.shape[0], rows):
            yield features[start : start + rows], labels[start : start + rows]
    return gen


def _moments(features, batch=97):
    moments = FeatureMoments(features.shape[1])
    for start in range(0, features.shape[0], batch):
        moments.update(features[start : start + batch])
    return moments


def _objective(features, labels, weight, bias, weight_decay):
    """The probe's objective at (W, b), in float64: mean CE + wd / 2 ||W sigma||^2 (V = W sigma)."""
    features = features.double()
    std = features.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6 * std.max(), std, torch.ones_like(std))
    logits = features @ weight.double().T + bias.double()
    return float(F.cross_entropy(logits, labels) + 0.5 * weight_decay * (weight.double() * std).square().sum())


def _assert_close_to_reference(features, labels, streamed, reference, weight_decay=1e-3):
    (weight, bias), (ref_weight, ref_bias) = streamed, reference
    ours, theirs = _objective(features, labels, weight, bias, weight_decay), _objective(features, labels, ref_weight,
                                                                                        ref_bias, weight_decay)
    assert ours <= theirs * (1 + PROBE_TOLERANCES["objective_rtol"]) + PROBE_TOLERANCES["objective_atol"], (ours, theirs)
    logits, ref_logits = features @ weight.T + bias, features @ ref_weight.T + ref_bias
    error = float((logits.softmax(1) - ref_logits.softmax(1)).abs().max())
    assert error <= PROBE_TOLERANCES["probabilities_atol"], error
    agreement = float((logits.argmax(1) == ref_logits.argmax(1)).double().mean())
    assert agreement >= PROBE_TOLERANCES["agreement"], agreement


# ---- the probe ------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer, lr, rows", [("lbfgs", 1.0, 10_000), ("lbfgs", 1.0, 230), ("adam", 0.05, 230)])
def test_streamed_probe_matches_the_full_batch_reference(rng_seed, optimizer, lr, rows):
    features, labels = _problem(1200, 48, 7, rng_seed)
    reference = fit_linear_classifier(features, labels, 7, iterations=100, lr=lr, optimizer=optimizer)
    moments = _moments(features)
    probe = StreamedLinearProbe(_chunks(features, labels, rows), features.shape[0], moments.mean, moments.std(), 7,
                                iterations=100, lr=lr, optimizer=optimizer)
    _assert_close_to_reference(features, labels, probe.fit(), reference)
    if optimizer == "adam":  # a fixed number of steps: the streamed fit does exactly that many
        assert probe.done == 100


def test_probe_at_the_imagenet_resnet50_shape(rng_seed):
    """d = 2048 (ResNet-50), C = 1000 classes, chunks of 256 rows: the streamed objective and its gradient
    equal the full-batch float64 ones at a random point, and a few L-BFGS iterations from there lower it.
    Whole fits are compared at the smaller shapes above: at this one, after 3 iterations under the 5/4
    evaluation budget, the two sums' float32 rounding can flip one strong-Wolfe decision and the paths
    part (it did in 3 of 4 seeds), so a trajectory comparison here would test rounding, not the probe."""
    from igds_fast.train_ve.linear_probe import standardisation

    features, labels = _problem(1100, 2048, 1000, rng_seed)
    moments = _moments(features, batch=256)
    probe = StreamedLinearProbe(_chunks(features, labels, 256), 1100, moments.mean, moments.std(), 1000, iterations=3)
    generator = torch.Generator().manual_seed(rng_seed + 1)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(1000, 2048, generator=generator) * 0.01)
        probe.bias.copy_(torch.randn(1000, generator=generator) * 0.1)
    value = float(probe.objective())
    grad_weight, grad_bias = probe.weight.grad.double(), probe.bias.grad.double()
    mean, std = (t.double() for t in standardisation(moments.mean, moments.std()))
    weight = probe.weight.detach().double().requires_grad_(True)
    bias = probe.bias.detach().double().requires_grad_(True)
    reference = F.cross_entropy((features.double() - mean) / std @ weight.T + bias, labels) \
        + 0.5 * 1e-3 * weight.square().sum()
    reference.backward()
    assert value == pytest.approx(float(reference.detach()), rel=1e-5)
    assert float((grad_weight - weight.grad).abs().max()) <= 1e-4 * float(weight.grad.abs().max())
    assert float((grad_bias - bias.grad).abs().max()) <= 1e-4 * float(bias.grad.abs().max())
    fitted = probe.fit()
    # Three iterations lower it by ~0.18 or, where the line search spends its evaluations on one step, by
    # ~0.098 (measured over 9 seeds: both modes; 0.1 failed seed 3613835753): 0.01 is far above float32
    # rounding of a ~7.1 objective and below both.
    assert _objective(features, labels, *fitted, 1e-3) < value - 0.01


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_rounds_and_a_saved_state_follow_one_uninterrupted_fit_bit_for_bit(rng_seed, monkeypatch, optimizer):
    features, labels = _problem(600, 24, 5, rng_seed)
    moments = _moments(features)
    lr = 1.0 if optimizer == "lbfgs" else 0.05

    def probe():
        return StreamedLinearProbe(_chunks(features, labels, 250), 600, moments.mean, moments.std(), 5,
                                   iterations=40, lr=lr, optimizer=optimizer)

    monkeypatch.setattr(probe_module, "PROBE_ROUND", 1000)
    one_call = probe()
    weight, bias = one_call.fit()
    assert one_call.rounds == 1
    monkeypatch.setattr(probe_module, "PROBE_ROUND", 3)
    rounds = probe()
    assert torch.equal(rounds.fit()[0], weight) and rounds.rounds > 3 and rounds.done == one_call.done
    # Stop after two rounds, carry the state through its serialised form (JSON header + tensors), go on.
    first = probe()
    first.run_round()
    first.run_round()
    tensors, header = first.state()
    header = json.loads(json.dumps(header))
    second = probe()
    second.load_state(tensors, header)
    resumed_weight, resumed_bias = second.fit()
    assert torch.equal(resumed_weight, weight) and torch.equal(resumed_bias, bias)


def test_a_fit_that_converges_at_a_round_boundary_stops_there_as_one_call_does(monkeypatch):
    """torch's L-BFGS checks, after each iteration, its step and loss change against tolerance_change; a
    round's own iteration cap comes first, so the next round must make those checks before iterating (it ran
    one or two iterations more than one call: 30 vs 32 for the seed that showed it). The problem (seed 0) is
    one whose single call stops on those checks, inside its evaluation budget; the rounds end exactly there."""
    features, labels = _problem(600, 24, 5, 0)
    moments = _moments(features)

    def probe():
        return StreamedLinearProbe(_chunks(features, labels, 250), 600, moments.mean, moments.std(), 5, iterations=40)

    monkeypatch.setattr(probe_module, "PROBE_ROUND", 1000)
    one_call = probe()
    weight, bias = one_call.fit()
    assert one_call.done < one_call.iterations and one_call.evaluations < one_call.budget  # stopped on a tolerance
    monkeypatch.setattr(probe_module, "PROBE_ROUND", one_call.done)  # the first round's cap is where one call stopped
    rounds = probe()
    rounds_weight, rounds_bias = rounds.fit()
    assert (rounds.done, rounds.rounds) == (one_call.done, 2)
    assert torch.equal(rounds_weight, weight) and torch.equal(rounds_bias, bias)


def test_a_bad_optimizer_is_one_line():
    with pytest.raises(IGDSInputError, match="classifier optimizer must be one of"):
        StreamedLinearProbe(lambda: [], 1, torch.zeros(2), torch.ones(2), 2, optimizer="sgd")


# ---- the stored features and the statistics -------------------------------------------------------


def test_feature_rows_in_a_file_equal_memory_and_cut_back_on_resume(tmp_path, rng_seed):
    features, _ = _problem(530, 40, 3, rng_seed)
    path = str(tmp_path / "run.checkpoint.features")
    held, stored = FeatureRows(530, 40), FeatureRows(530, 40, path)
    for start in range(0, 530, 100):
        held.append(features[start : start + 100])
        stored.append(features[start : start + 100].double())  # stored as float32 whatever comes in
    stored.flush()
    assert os.path.getsize(path) == 530 * 40 * 4 and stored.complete
    for (span_a, a), (span_b, b) in zip(held.chunks("cpu", 128), stored.chunks("cpu", 128), strict=True):
        assert span_a == span_b and torch.equal(a, b) and torch.equal(a, features[span_a])
    stored.close()
    # An interrupted pass counted 200 rows: the file is cut to them and the rest written again.
    resumed = FeatureRows(530, 40, path, rows_done=200)
    assert os.path.getsize(path) == 200 * 40 * 4
    resumed.append(features[200:])
    assert torch.equal(torch.cat([b for _, b in resumed.chunks("cpu", 64)]), features)
    resumed.close()
    with pytest.raises(IGDSInputError, match="fewer than the 9999 feature rows"):
        FeatureRows(10_000, 40, path, rows_done=9999)
    with pytest.raises(IGDSInputError, match="do not fit"):
        FeatureRows(5, 40).append(torch.zeros(6, 40))


def test_feature_moments_equal_the_float64_statistics(rng_seed):
    features, _ = _problem(777, 33, 3, rng_seed)
    moments = FeatureMoments.from_state(_moments(features, batch=50).state())
    reference = features.double()
    torch.testing.assert_close(moments.mean, reference.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moments.std(), reference.std(0, unbiased=False), rtol=1e-10, atol=1e-12)
    assert moments.count == 777


def test_split_statistics_equal_the_full_batch_formulas(rng_seed):
    features, labels = _problem(500, 32, 6, rng_seed)
    weight, bias = torch.randn(6, 32) * 0.1, torch.randn(6)
    log_q = compute_log_centroids(features, labels, 6, 2.0)
    statistics = SplitStatistics(weight, bias, log_q, 2.0)
    for start in range(0, 500, 64):
        statistics.update(features[start : start + 64], labels[start : start + 64])
    statistics = SplitStatistics.from_state(weight, bias, log_q, 2.0, json.loads(json.dumps(statistics.state())))
    entropy = label_entropy(labels, 6)
    result = statistics.result(entropy)
    # The report's formulas before the classifier stage was streamed (all features at once).
    logits = F.linear(features, weight, bias)
    information, cross_entropy = prototype_information(logits, labels, entropy)
    kl = contextual_kl(features.double(), labels, log_q.double(), 2.0)
    assert result["images"] == 500
    assert result["accuracy"] == float((logits.argmax(dim=1) == labels).double().mean() * 100.0)
    assert result["cross_entropy"] == pytest.approx(cross_entropy, rel=1e-12)
    assert result["prototype_information"] == pytest.approx(information, rel=1e-12)
    assert result["contextual_information"] == pytest.approx(float(kl.mean()), rel=1e-12)


# ---- the stage in train_ve ----------------------------------------------------------------------


def _images(count, seed, classes=3):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    base = torch.linspace(-0.6, 0.6, classes)[labels][:, None, None, None]
    images = (base + 0.4 * torch.rand(count, 3, 16, 16, generator=generator) - 0.2).clamp(-1, 1)
    return images, labels


def _config(**overrides):
    settings = dict(arch="resnet18", in_channels=3, resolution=16, epochs=0, batch_size=16, queue_size=32,
                    bn_splits=2, moco_momentum=0.9, optimizer="adam", lr=1e-3, classifier_epochs=25, seed=1,
                    device="cpu")
    settings.update(overrides)
    return VETrainConfig(**settings)


def test_the_stage_matches_the_full_batch_pipeline(rng_seed):
    """The bundle and report of train_ve against the reference assembled from the full-batch pieces."""
    images, labels = _images(120, rng_seed)
    val_images, val_labels = _images(45, rng_seed + 1)
    names = ["a", "b", "c"]
    ve, report = train_ve(images, labels, names, _config(), val_images, val_labels, **QUIET)
    features = extract_features(ve.encoder, ve.preprocess, images, "cpu")
    reference = fit_linear_classifier(features, labels, 3, iterations=25)
    _assert_close_to_reference(features, labels, (ve.weight, ve.bias), reference)
    ref_log_q = compute_log_centroids(features, labels, 3, 1.0)
    torch.testing.assert_close(ve.log_centroids, ref_log_q, rtol=0, atol=PROBE_TOLERANCES["centroids_atol"])
    for split, x, y in (("train", images, labels), ("val", val_images, val_labels)):
        z = extract_features(ve.encoder, ve.preprocess, x, "cpu")
        kl = contextual_kl(z.double(), y, ve.log_centroids.double(), 1.0)
        assert report[split]["contextual_information"] == pytest.approx(float(kl.mean()), rel=1e-9)
        assert report[split]["images"] == y.shape[0]


@pytest.mark.parametrize("epochs", [0, 1])
def test_the_stage_resumes_bit_for_bit_after_every_kind_of_save(rng_seed, tmp_path, monkeypatch, epochs):
    images, labels = _images(150, rng_seed)
    val = TensorImages(*_images(30, rng_seed + 1))
    train = TensorImages(images, labels)
    monkeypatch.setattr(stage_module, "FEATURE_BATCH", 32)  # 5 feature batches
    monkeypatch.setattr(probe_module, "PROBE_ROUND", 4)
    config = _config(epochs=epochs, classifier_epochs=12)
    uninterrupted, report = train_ve_from_source(train, ["a", "b", "c"], config, val, **QUIET)

    monkeypatch.setattr(stage_module, "SAVE_EVERY_SECONDS", 0.0)
    original_save = stage_module._StageState.save
    phases = []

    class Interrupted(Exception):
        pass

    def record(self, **changes):
        original_save(self, **changes)
        phases.append((self.header["phase"], self.header["rows"], self.header.get("probe", {}).get("done")))

    monkeypatch.setattr(stage_module._StageState, "save", record)
    checkpoint = str(tmp_path / "ve.checkpoint")
    train_ve_from_source(train, ["a", "b", "c"], config, val, checkpoint=checkpoint, **QUIET)
    kinds = sorted({phase for phase, _, _ in phases})
    assert kinds == ["done", "features", "probe"], phases
    features_file, state_file = stage_files(checkpoint)
    assert not os.path.exists(features_file) and os.path.exists(state_file)  # features removed once reported
    os.unlink(state_file)
    if os.path.exists(checkpoint):
        os.unlink(checkpoint)

    # Stop right after each kind of save (a SIGKILL after an atomic write), then rerun to the end: in the
    # feature pass, after it, after a probe round, after the report (with a contrastive stage: one).
    stops = (1, 4, 5, len(phases) - 2, len(phases) - 1) if epochs == 0 else (2,)
    for stop_at in stops:
        calls = []

        def save_then_stop(self, **changes):
            original_save(self, **changes)
            calls.append(1)
            if len(calls) == stop_at:
                raise Interrupted(f"killed after save {stop_at}")

        monkeypatch.setattr(stage_module._StageState, "save", save_then_stop)
        with pytest.raises(Interrupted):
            train_ve_from_source(train, ["a", "b", "c"], config, val, checkpoint=checkpoint, **QUIET)
        monkeypatch.setattr(stage_module._StageState, "save", original_save)
        messages = []
        resumed, resumed_report = train_ve_from_source(train, ["a", "b", "c"], config, val, checkpoint=checkpoint,
                                                       log=messages.append)
        assert any("classifier stage resumed" in m for m in messages), (stop_at, messages)
        for key, value in uninterrupted.bundle_tensors().items():
            assert torch.equal(resumed.bundle_tensors()[key], value), (stop_at, key)
        for split in ("train", "val"):
            assert resumed_report[split] == report[split], (stop_at, split)
        os.unlink(state_file)
        if os.path.exists(checkpoint):
            os.unlink(checkpoint)


def test_a_stage_state_of_another_run_is_refused(rng_seed, tmp_path, monkeypatch):
    train = TensorImages(*_images(60, rng_seed))
    checkpoint = str(tmp_path / "ve.checkpoint")
    train_ve_from_source(train, ["a", "b", "c"], _config(classifier_epochs=3), checkpoint=checkpoint, **QUIET)
    with pytest.raises(IGDSInputError, match=r"ve.checkpoint.classifier belongs to another run \(config differ\)"):
        train_ve_from_source(train, ["a", "b", "c"], _config(classifier_epochs=4), checkpoint=checkpoint, **QUIET)


_FLAT_MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    from igds_fast.data import TensorImages
    from igds_fast.preprocess import EncoderPreprocess
    from igds_fast.train_ve import VETrainConfig
    from igds_fast.train_ve.classifier_stage import run_classifier_stage

    class Encoder(torch.nn.Module):  # a ResNet-50-wide feature map (d = 2048) without the convolutions
        feature_dim = 2048
        def __init__(self):
            super().__init__()
            self.project = torch.nn.Linear(3 * 4 * 4, 2048)
        def forward_features(self, x):
            return torch.nn.functional.softplus(self.project(x.flatten(1)))

    count, folder = int(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    images = torch.rand(count, 3, 4, 4) * 2 - 1
    labels = torch.arange(count) % 10
    config = VETrainConfig(resolution=4, epochs=0, classifier_epochs=2, device="cpu")
    weight, bias, log_q, statistics = run_classifier_stage(
        Encoder().eval().requires_grad_(False), EncoderPreprocess(4, (0.5,) * 3, (0.25,) * 3),
        TensorImages(images, labels), config, 10, torch.device("cpu"), lambda m: None, folder + "/run.checkpoint",
        {"run": count})
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "accuracy": statistics.result(0.0)["accuracy"]}))
""")


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """3,000 vs 30,000 images at d = 2048: [N, d] float32 would add 221 MB (the float64 copies of
    before, 4 more times that); the stage's peak grows by the images and labels (~3 MB) only."""
    peaks = {}
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for count in (3000, 30000):
        folder = tmp_path / str(count)
        folder.mkdir()
        done = subprocess.run([sys.executable, "-c", _FLAT_MEMORY_CHILD, str(count), str(folder)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[count] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]
        assert not os.path.exists(folder / "run.checkpoint.features")
    assert peaks[30000] - peaks[3000] < 40, peaks


def test_train_ve_refuses_a_disk_too_small_for_the_features_before_training(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import igds_fast.limits as limits
    from igds_fast.cli import main

    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (8, 8), (40 * index, 90, 200 if name == "a" else 10)).save(tmp_path / "data" / name / f"{index}.png")
    monkeypatch.setattr(limits, "free_disk_bytes", lambda path: 1000)
    code = main(["train-ve", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ve.safetensors"),
                 "--arch", "resnet50", "--epochs", "0", "--resolution", "8", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "the linear probe's features of 6 images (resnet50: 2048 each, float32" in err, err
    assert "needs 48.0 KiB of disk but" in err, err
    assert not (tmp_path / "ve.safetensors").exists()
