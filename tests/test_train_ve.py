"""VE training: CMI term sign and gradient, centroid EMA, InfoNCE, information estimates, bundles, errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import igds_fast.train_ve.pipeline as pipeline_module
from igds_fast.data import load_digits_split
from igds_fast.errors import IGDSInputError
from igds_fast.models.resnet import resnet18
from igds_fast.preprocess import IMAGENET_MEAN, IMAGENET_STD
from igds_fast.train_ve import (
    VETrainConfig,
    cmi_term,
    fit_linear_classifier,
    info_nce_loss,
    label_entropy,
    prototype_information,
    train_ve,
    update_log_centroids,
)
from igds_fast.train_ve.features import frozen_bn_statistics
from igds_fast import cli
from igds_fast.cli.train_ve import run as run_train_ve
from igds_fast.guidance.objective import centroid_kl
from igds_fast.ve import VariationalEstimator

CLASS_NAMES = [str(d) for d in range(10)]
QUIET = dict(log=lambda message: None)


@pytest.fixture(scope="module")
def digits_small():
    """10 training images per digit (100) and 60 held-out ones, 16x16 grayscale in [-1, 1]."""
    train_x, train_y, test_x, test_y = load_digits_split(image_size=16)
    index = torch.cat([torch.nonzero(train_y == d).flatten()[:10] for d in range(10)])
    return train_x[index], train_y[index], test_x[:60], test_y[:60]


def small_config(**overrides) -> VETrainConfig:
    # bn_splits 2: shuffle-BN on, without the per-forward overhead of many tiny groups.
    settings = dict(arch="resnet18", in_channels=1, resolution=16, epochs=2, batch_size=32, queue_size=64,
                    bn_splits=2, moco_momentum=0.9, optimizer="adam", lr=1e-3, classifier_epochs=30, horizontal_flip=False)
    settings.update(overrides)
    return VETrainConfig(**settings)


# ---- pieces ---------------------------------------------------------------------------------------


def test_centroid_ema_with_momentum_zero_is_the_batch_class_mean(rng_seed):
    log_p = torch.log_softmax(torch.randn(9, 6, dtype=torch.float64) * 2, dim=1)
    labels = torch.tensor([0, 2, 2, 0, 0, 2, 2, 0, 2])  # class 1 absent
    log_q = torch.log_softmax(torch.randn(3, 6, dtype=torch.float64), dim=1)
    seen = torch.tensor([True, False, True])
    untouched = log_q[1].clone()
    update_log_centroids(log_q, seen, log_p, labels, momentum=0.0)
    for label in (0, 2):
        class_mean = log_p[labels == label].exp().mean(dim=0)
        torch.testing.assert_close(log_q[label].exp(), class_mean, rtol=1e-12, atol=1e-15)
    assert torch.equal(log_q[1], untouched) and seen.tolist() == [True, False, True]

    # Momentum 0.75: Q <- 0.75 Q + 0.25 batch mean for seen classes; a first sighting takes the mean.
    old = log_q.exp().clone()
    seen_before = torch.tensor([True, False, False])
    seen_now = seen_before.clone()
    new_log_p = torch.log_softmax(torch.randn(5, 6, dtype=torch.float64), dim=1)
    new_labels = torch.tensor([0, 2, 0, 2, 2])
    update_log_centroids(log_q, seen_now, new_log_p, new_labels, momentum=0.75)
    mean0 = new_log_p[new_labels == 0].exp().mean(dim=0)
    mean2 = new_log_p[new_labels == 2].exp().mean(dim=0)
    torch.testing.assert_close(log_q[0].exp(), 0.75 * old[0] + 0.25 * mean0, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(log_q[2].exp(), mean2, rtol=1e-12, atol=1e-15)
    assert seen_now.tolist() == [True, False, True]


def test_centroid_ema_is_finite_where_p_underflows():
    """Small tau: P underflows to 0 in places, log Q must stay finite (log-space update)."""
    features = torch.tensor([[0.0, 30.0, 60.0], [60.0, 0.0, 30.0]])
    log_p = torch.log_softmax(features / 0.05, dim=1)  # exp(-1200) == 0 in float32
    assert bool((log_p.exp() == 0).any())
    log_q = torch.zeros(1, 3)
    seen = torch.zeros(1, dtype=torch.bool)
    update_log_centroids(log_q, seen, log_p, torch.tensor([0, 0]), momentum=0.5)
    assert bool(torch.isfinite(log_q).all())
    torch.testing.assert_close(log_q[0], torch.logsumexp(log_p, dim=0) - math.log(2))


def test_frozen_bn_statistics_uses_batch_statistics_and_keeps_running_ones(rng_seed):
    norm = torch.nn.BatchNorm2d(3).train()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    saved = (norm.running_mean.clone(), norm.running_var.clone())
    x = torch.randn(4, 3, 2, 2) * 3 + 1
    with frozen_bn_statistics(norm):
        out = norm(x)
    assert torch.equal(norm.running_mean, saved[0]) and torch.equal(norm.running_var, saved[1])
    expected = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + norm.eps)
    torch.testing.assert_close(out, expected)
    assert norm.momentum == 0.1  # restored
    norm(x)
    assert not torch.equal(norm.running_mean, saved[0])


def test_cmi_term_gradient_ascends_kl(rng_seed):
    """L = InfoNCE - lambda * E KL: the CMI part's gradient is -lambda * dKL/dz with
    dKL/dz_j = P_j (log P_j - log Q_j - KL) / tau, and a descent step on L raises E KL."""
    tau, lam = 0.7, 0.5
    features = (torch.randn(8, 12, dtype=torch.float64) * 1.5).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    log_q = torch.log_softmax(torch.randn(3, 12, dtype=torch.float64), dim=1)
    loss = -lam * cmi_term(features, labels, log_q, tau)
    (gradient,) = torch.autograd.grad(loss, features)

    with torch.no_grad():
        log_p = torch.log_softmax(features / tau, dim=1)
        kl = centroid_kl(log_p, log_q, labels)
        closed_form = log_p.exp() * (log_p - log_q[labels] - kl[:, None]) / tau
    torch.testing.assert_close(gradient, -lam * closed_form / features.shape[0])

    with torch.no_grad():
        before = float(cmi_term(features, labels, log_q, tau))
        after = float(cmi_term(features - 0.5 * gradient, labels, log_q, tau))
    assert after > before


def test_info_nce_matches_hand_computation_and_masks_own_image(rng_seed):
    queries = torch.nn.functional.normalize(torch.randn(3, 5, dtype=torch.float64), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(3, 5, dtype=torch.float64), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(4, 5, dtype=torch.float64), dim=1)
    temperature = 0.2
    expected = []
    for i in range(3):
        logits = np.array([float(queries[i] @ keys[i])] + [float(queries[i] @ queue[j]) for j in range(4)]) / temperature
        expected.append(-(logits[0] - np.log(np.exp(logits).sum())))
    assert abs(float(info_nce_loss(queries, keys, queue, temperature)) - np.mean(expected)) < 1e-12

    # Queue entry 2 comes from query 1's own image: it must not count as query 1's negative.
    query_ids, queue_ids = torch.tensor([10, 11, 12]), torch.tensor([-1, 5, 11, 7])
    masked = []
    for i in range(3):
        negatives = [j for j in range(4) if int(queue_ids[j]) != int(query_ids[i])]
        logits = np.array([float(queries[i] @ keys[i])] + [float(queries[i] @ queue[j]) for j in negatives]) / temperature
        masked.append(-(logits[0] - np.log(np.exp(logits).sum())))
    got = float(info_nce_loss(queries, keys, queue, temperature, query_ids, queue_ids))
    assert abs(got - np.mean(masked)) < 1e-12 and abs(got - np.mean(expected)) > 1e-6


def test_prototype_information_against_hand_computation(rng_seed):
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3])
    entropy = label_entropy(labels, 5)  # class 4 absent: contributes 0
    fractions = np.array([2, 1, 3, 2]) / 8
    assert abs(entropy - float(-(fractions * np.log(fractions)).sum())) < 1e-12
    logits = torch.randn(8, 5, dtype=torch.float64) * 3
    information, cross_entropy = prototype_information(logits, labels, entropy)
    rows = logits.numpy()
    log_softmax = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
    expected_ce = -np.mean(log_softmax[np.arange(8), labels.numpy()])
    assert abs(cross_entropy - expected_ce) < 1e-12
    assert abs(information - (entropy - expected_ce)) < 1e-12


def test_linear_classifier_folds_standardisation_exactly(rng_seed):
    """The returned (W, b) must be the optimum of the standardised problem mapped back to raw z:
    the objective's gradient in standardised coordinates, V = W sigma, c = b + W mu, is ~0."""
    generator = torch.Generator().manual_seed(rng_seed)
    centres = torch.randn(3, 6, generator=generator) * 2
    labels = torch.arange(60) % 3
    scale = torch.tensor([1.0, 10.0, 0.1, 3.0, 50.0, 0.5])
    features = (centres[labels] + torch.randn(60, 6, generator=generator)) * scale + 100.0
    weight, bias = fit_linear_classifier(features, labels, 3, iterations=200, weight_decay=1e-2)
    mean, std = features.mean(0), features.std(0, unbiased=False)
    v = (weight * std).double().requires_grad_(True)
    c = (bias + weight @ mean).double().requires_grad_(True)
    standardised = ((features - mean) / std).double()
    objective = torch.nn.functional.cross_entropy(standardised @ v.t() + c, labels) + 0.5e-2 * v.square().sum()
    grad_v, grad_c = torch.autograd.grad(objective, (v, c))
    assert float(grad_v.abs().max()) < 1e-3 and float(grad_c.abs().max()) < 1e-3
    raw_logits = features @ weight.t() + bias
    torch.testing.assert_close(raw_logits.double(), (standardised @ v.t() + c).detach(), rtol=1e-4, atol=1e-3)


# ---- training end to end --------------------------------------------------------------------------


def test_train_ve_lambda_zero_and_positive(digits_small, tmp_path, rng_seed):
    train_x, train_y, val_x, val_y = digits_small
    seed = rng_seed % 1000
    plain, plain_report = train_ve(train_x, train_y, CLASS_NAMES, small_config(seed=seed), val_x, val_y, **QUIET)
    cmi, cmi_report = train_ve(train_x, train_y, CLASS_NAMES, small_config(seed=seed, lambda_cmi=10.0), **QUIET)
    # lambda = 0: the centroids never reach the gradient, so re-estimating them per epoch instead of
    # per batch (an extra no-grad pass over the data) must change nothing: no parameter, no draw of
    # the seeded generator.
    epoch_mode, _ = train_ve(train_x, train_y, CLASS_NAMES, small_config(seed=seed, centroid_update="epoch"), **QUIET)
    plain_tensors, epoch_tensors = plain.bundle_tensors(), epoch_mode.bundle_tensors()
    assert plain_tensors.keys() == epoch_tensors.keys()
    for key, tensor in plain_tensors.items():
        assert torch.equal(tensor, epoch_tensors[key]), key

    # The CMI term pushes P_x away from its class centroid: higher E KL(P || Q_y) on the train data.
    assert cmi_report["train"]["contextual_information"] > plain_report["train"]["contextual_information"]
    assert len(plain_report["history"]) == 2 and plain_report["effective"] == {"batch_size": 32, "queue_size": 64}

    for name, ve, report in (("plain", plain, plain_report), ("cmi", cmi, cmi_report)):
        path = tmp_path / f"{name}.safetensors"
        ve.save(path)
        loaded = VariationalEstimator.load(path)
        assert loaded.class_names == CLASS_NAMES and loaded.tau == 1.0 and loaded.encoder.in_channels == 1
        with torch.no_grad():
            features = loaded.features(train_x)
            logits = loaded.logits(features)
        torch.testing.assert_close(features, ve.features(train_x))
        # log Q is the class mean of softmax(z / tau) over the training images (frozen encoder).
        for label in (0, 7):
            centroid = torch.softmax(features[train_y == label].double(), dim=1).mean(0)
            torch.testing.assert_close(loaded.log_centroids[label].double().exp(), centroid, rtol=1e-4, atol=1e-9)
        # The report's estimates are H(Y) - CE and E KL of this very bundle.
        rows = logits.double().numpy()
        log_softmax = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        cross_entropy = -np.mean(log_softmax[np.arange(len(train_y)), train_y.numpy()])
        assert abs(report["label_entropy"] - math.log(10)) < 1e-9  # 10 images of each digit
        assert abs(report["train"]["prototype_information"] - (math.log(10) - cross_entropy)) < 1e-4
        log_p = torch.log_softmax(features.double(), dim=1)
        kl = (log_p.exp() * (log_p - loaded.log_centroids.double()[train_y])).sum(1).mean()
        assert abs(report["train"]["contextual_information"] - float(kl)) < 1e-4
        accuracy = float((logits.argmax(1) == train_y).double().mean() * 100)
        assert abs(report["train"]["accuracy"] - accuracy) < 1e-9
    assert plain_report["val"]["images"] == 60 and "val" not in cmi_report
    json.dumps(plain_report)  # the CLI writes it as JSON


def test_moco_init_loads_the_query_encoder(digits_small, tmp_path):
    train_x, train_y, _, _ = digits_small
    rgb = train_x.repeat(1, 3, 1, 1)
    reference = resnet18(num_classes=None)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.05)  # not the default init: a copy must really come from the file
    state = {f"module.encoder_q.{k}": v for k, v in reference.state_dict().items()}
    state["module.encoder_q.fc.0.weight"] = torch.randn(4, 512)  # MoCo v2 head: dropped
    state["module.encoder_k.conv1.weight"] = torch.randn(64, 3, 7, 7)  # key encoder: ignored
    path = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": state, "arch": "resnet18"}, path)
    config = VETrainConfig(in_channels=3, resolution=16, epochs=0, classifier_epochs=20, init=f"moco:{path}")
    ve, report = train_ve(rgb, train_y, CLASS_NAMES, config, **QUIET)
    for key, value in reference.trunk_state_dict().items():
        assert torch.equal(ve.encoder.state_dict()[key], value), key
    assert report["mean"] == list(IMAGENET_MEAN) and report["std"] == list(IMAGENET_STD)

    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.randn(64, 3, 7, 7)}}, bad)
    with pytest.raises(IGDSInputError, match="does not fit a resnet18 trunk") as info:
        train_ve(rgb, train_y, CLASS_NAMES, VETrainConfig(in_channels=3, resolution=16, init=f"moco:{bad}"), **QUIET)
    assert "\n" not in str(info.value)


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to start training fails the test: errors must be raised before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the input error was raised")

    monkeypatch.setattr(pipeline_module, "MoCoTrainer", refuse)
    monkeypatch.setattr(pipeline_module, "run_classifier_stage", refuse)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_images", "no training images"),
        ("label_too_large", r"labels span \[0, 10\] but there are 10 class names"),
        ("negative_label", r"labels span \[-1, 9\]"),
        ("too_few_names", r"labels span \[0, 9\] but there are 9 class names"),
        ("too_many_names", r"no images of class\(es\) \['extra'\]"),
        ("float_labels", "labels must be integers"),
        ("wrong_channels", "3 channel"),
        ("val_without_labels", "val_images and val_labels"),
        ("val_label_out_of_range", r"validation labels span \[0, 12\]"),
        ("labels_length", r"labels must be a \[100\] tensor"),
    ],
)
def test_bad_data_is_refused_before_training(digits_small, no_training, case, message):
    train_x, train_y, val_x, val_y = digits_small
    names = list(CLASS_NAMES)
    val = {}
    if case == "no_images":
        train_x, train_y = train_x[:0], train_y[:0]
    elif case == "label_too_large":
        train_y = train_y.clone()
        train_y[3] = 10
    elif case == "negative_label":
        train_y = train_y.clone()
        train_y[0] = -1
    elif case == "too_few_names":
        names = names[:9]
    elif case == "too_many_names":
        names = names + ["extra"]
    elif case == "float_labels":
        train_y = train_y.float()
    elif case == "wrong_channels":
        train_x = train_x.repeat(1, 3, 1, 1)
    elif case == "val_without_labels":
        val = dict(val_images=val_x)
    elif case == "val_label_out_of_range":
        bad = val_y.clone()
        bad[5] = 12
        val = dict(val_images=val_x, val_labels=bad)
    elif case == "labels_length":
        train_y = train_y[:-1]
    with pytest.raises(IGDSInputError, match=message) as info:
        train_ve(train_x, train_y, names, small_config(), **val, **QUIET)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(digits_small, no_training):
    train_x, train_y, _, _ = digits_small
    with pytest.raises(IGDSInputError, match="CUDA is not available"):
        train_ve(train_x, train_y, CLASS_NAMES, small_config(device="cuda"), **QUIET)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tau=0.0), "tau must be a positive finite number"),
        (dict(tau=-1.0), "tau must be a positive finite number"),
        (dict(tau=float("nan")), "tau must be a positive finite number"),
        (dict(init="imagenet:weights.pth"), "unknown init scheme 'imagenet:weights.pth'"),
        (dict(init="moco"), "unknown init scheme"),
        (dict(init="moco:"), "needs a checkpoint path"),
        (dict(init="moco:/nonexistent/moco_v2_800ep.pth.tar", in_channels=3), "MoCo checkpoint not found: /nonexistent"),
        (dict(init="moco:/nonexistent/x.pth", in_channels=1), "in_channels must be 3"),
        (dict(arch="resnet34"), "unknown arch"),
        (dict(lambda_cmi=-0.1), "lambda_cmi must be a non-negative"),
        (dict(moco_momentum=1.0), r"moco_momentum must be in \[0, 1\)"),
        (dict(centroid_update="batch"), "centroid_update"),
        (dict(batch_size=1), "batch_size must be >= 2"),
        (dict(norm="instance", resolution=32), "needs resolution > 32"),
        (dict(mean=(0.5,)), "give both mean and std"),
        (dict(mean=(0.5, 0.5), std=(0.2, 0.2)), "2 values for 1 channel"),
        (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
        (dict(classifier_epochs=0), "classifier_epochs must be >= 1"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(IGDSInputError, match=message) as info:
        small_config(**overrides)
    assert "\n" not in str(info.value)


def test_digits_preset_is_valid():
    config = VETrainConfig.digits()
    assert (config.arch, config.in_channels, config.resolution) == ("resnet18", 1, 16)
    assert not config.horizontal_flip and config.lambda_cmi > 0
    assert VETrainConfig.digits(epochs=3).epochs == 3


def test_train_ve_cli(tmp_path, digits_small, capsys):
    from igds_fast.imageio import save_png_atomic

    train_x, train_y, val_x, val_y = digits_small
    written = {"train": 0, "val": 0}
    for root, images, labels in (("train", train_x, train_y), ("val", val_x, val_y)):
        for label in range(3):
            folder = tmp_path / root / f"digit{label}"
            folder.mkdir(parents=True)
            for k, index in enumerate(torch.nonzero(labels == label).flatten()[:6].tolist()):
                save_png_atomic(folder / f"{k}.png", images[index])
                written[root] += 1
    out = tmp_path / "ve.safetensors"
    args = cli.parse([
        "train-ve", "--data", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--out", str(out),
        "--channels", "1", "--resolution", "16", "--epochs", "1", "--batch-size", "6", "--queue-size", "16",
        "--lambda", "0.1", "--classifier-epochs", "10", "--no-flip", "--quiet",
    ])
    assert args.handler is run_train_ve
    assert args.handler(args) == 0
    ve = VariationalEstimator.load(out)
    assert ve.class_names == ["digit0", "digit1", "digit2"] and ve.encoder.in_channels == 1
    report = json.loads((tmp_path / "ve.safetensors.report.json").read_text())
    assert report["config"]["lambda_cmi"] == 0.1 and report["effective"]["queue_size"] == 16
    assert report["settings"]["training"]["lambda_cmi"] == 0.1 and report["settings"]["progress"] is False
    assert report["train"]["images"] == written["train"] == 18 and report["val"]["images"] == written["val"]
    assert "VE written to" in capsys.readouterr().out

    missing_folder = cli.parse(["train-ve", "--data", str(tmp_path / "train"), "--out", str(tmp_path / "no" / "ve.st")])
    with pytest.raises(IGDSInputError, match="does not exist"):
        run_train_ve(missing_folder)
