"""VariationalEstimator: construction checks, frozen features, safetensors bundle, class centroids."""
import json
import os
import struct

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from igds_fast.errors import IGDSInputError
from igds_fast.models.resnet import resnet18
from igds_fast.preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess
from igds_fast.ve import (
    LogCentroidAccumulator,
    VariationalEstimator,
    accumulate_log_centroids,
    compute_log_centroids,
)

NUM_CLASSES = 4
DIM = 512


def _random_encoder():
    encoder = resnet18(num_classes=None)
    for module in encoder.modules():  # non-trivial BN statistics: a lost buffer changes the output
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.normal_(0, 0.1)
            module.num_batches_tracked.fill_(int(torch.randint(1, 10_000, ())))
    return encoder


def _make_ve(encoder=None, **overrides):
    parts = dict(
        encoder=encoder if encoder is not None else _random_encoder(),
        weight=torch.randn(NUM_CLASSES, DIM) * 0.05,
        bias=torch.randn(NUM_CLASSES),
        log_centroids=torch.log_softmax(torch.randn(NUM_CLASSES, DIM), dim=1),
        tau=float(torch.empty(()).uniform_(0.5, 2.0)),
        preprocess=EncoderPreprocess(32, IMAGENET_MEAN, IMAGENET_STD),
        class_names=[f"class_{i}" for i in range(NUM_CLASSES)],
    )
    parts.update(overrides)
    return VariationalEstimator(**parts)


@pytest.fixture(scope="module")
def shared_encoder():
    """One random trunk for the tests that only read it (building and running ResNets is the slow part)."""
    return _random_encoder()


@pytest.fixture(scope="module")
def saved_bundle(tmp_path_factory, shared_encoder):
    """A saved bundle the tests only read (corrupt variants are written to each test's tmp_path)."""
    ve = _make_ve(shared_encoder)
    path = tmp_path_factory.mktemp("bundle") / "ve.safetensors"
    ve.save(path)
    return ve, path


def _images(batch=2, size=40):
    return torch.rand(batch, 3, size, size) * 2 - 1


# ---- construction ------------------------------------------------------------------------------


def test_frozen_eval_and_metadata(shared_encoder):
    ve = _make_ve(shared_encoder)
    assert ve.num_classes == NUM_CLASSES and ve.feature_dim == DIM
    assert ve.arch == "resnet18" and ve.softplus_beta == 3.0 and ve.norm == "batch" and ve.resolution == 32
    assert all(not p.requires_grad for p in ve.parameters())
    assert not ve.weight.requires_grad and not ve.log_centroids.requires_grad
    ve.train()
    assert not ve.training and not ve.encoder.training


@pytest.mark.parametrize(
    "override,match",
    [
        ({"weight": torch.randn(NUM_CLASSES, 100)}, r"weight must be \[C, 512\]"),
        ({"bias": torch.randn(NUM_CLASSES + 1)}, r"bias must have shape \(4,\)"),
        ({"log_centroids": torch.randn(NUM_CLASSES, DIM - 1)}, r"log_centroids must be \[4, 512\]"),
        ({"log_centroids": torch.full((NUM_CLASSES, DIM), -float("inf"))}, "non-finite"),
        ({"tau": 0.0}, "tau must be a positive"),
        ({"tau": -1.0}, "tau must be a positive"),
        ({"tau": float("nan")}, "tau must be a positive"),
        ({"class_names": ["a", "b"]}, "class_names has 2 entries but the classifier has 4"),
        ({"preprocess": EncoderPreprocess(32, (0.5,), (0.5,))}, "1 channels but the encoder reads 3"),
        ({"weight": torch.randint(0, 3, (NUM_CLASSES, DIM))}, "floating-point"),
    ],
)
def test_constructor_validation(shared_encoder, override, match):
    with pytest.raises(IGDSInputError, match=match):
        _make_ve(shared_encoder, **override)


# ---- forward -----------------------------------------------------------------------------------


def test_features_gradient_wrt_image(shared_encoder):
    ve = _make_ve(shared_encoder)
    x = _images().requires_grad_(True)
    z = ve.features(x)
    assert z.shape == (2, DIM)
    (z * torch.randn_like(z)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in ve.parameters())


def test_forward_is_logits_of_features(shared_encoder):
    ve = _make_ve(shared_encoder)
    x = _images(batch=1)
    with torch.no_grad():
        z = ve.features(x)
        logits = ve(x)
    torch.testing.assert_close(logits, z @ ve.weight.T + ve.bias)
    with pytest.raises(IGDSInputError, match=r"features must be \[B, 512\]"):
        ve.logits(torch.randn(2, 3))


# ---- bundle ------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(saved_bundle):
    ve, path = saved_bundle
    loaded = VariationalEstimator.load(path)
    assert loaded.class_names == ve.class_names and loaded.tau == ve.tau
    assert (loaded.arch, loaded.softplus_beta, loaded.norm) == (ve.arch, ve.softplus_beta, ve.norm)
    assert (loaded.preprocess.resolution, loaded.preprocess.mean, loaded.preprocess.std) == (
        ve.preprocess.resolution, ve.preprocess.mean, ve.preprocess.std)
    for name in ("weight", "bias", "log_centroids"):
        assert torch.equal(getattr(loaded, name), getattr(ve, name)), name
    original_state = ve.encoder.trunk_state_dict()
    loaded_state = loaded.encoder.trunk_state_dict()
    assert set(loaded_state) == set(original_state)
    for key, value in original_state.items():
        assert torch.equal(loaded_state[key], value) and loaded_state[key].dtype == value.dtype, key
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    x = _images(batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), ve(x))


def test_file_is_plain_safetensors_without_pickle(saved_bundle):
    ve, path = saved_bundle
    raw = path.read_bytes()
    # safetensors layout: u64 header length, JSON header, then raw tensor bytes. If the header's
    # offsets account for every byte after it, there is nowhere a pickle could hide.
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert 8 + header_len + spans[-1][1] == len(raw)
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[: 8 + header_len]

    with safe_open(str(path), framework="pt") as bundle:
        meta = json.loads(bundle.metadata()["igds_ve"])
        keys = set(bundle.keys())
    assert meta["format_version"] == 1 and meta["num_classes"] == NUM_CLASSES and meta["feature_dim"] == DIM
    assert meta["class_names"] == ve.class_names and meta["tau"] == ve.tau
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["resolution"] == 32
    assert {"classifier.weight", "classifier.bias", "log_centroids", "encoder.layer4.1.bn2.running_var",
            "encoder.bn1.num_batches_tracked"} <= keys
    assert not any(k.startswith("encoder.fc.") for k in keys)


def test_save_is_atomic(tmp_path, saved_bundle, monkeypatch):
    ve, _ = saved_bundle
    path = tmp_path / "ve.safetensors"
    ve.save(path)
    ve.save(path)  # overwriting an existing bundle works
    before = path.read_bytes()

    def fail_midway(fd):  # the bundle's bytes are in the temporary file, not yet on disk
        raise OSError("disk full")

    # The bundle goes through the one atomic writer (imageio.write_bytes_atomic), as every artifact.
    monkeypatch.setattr(os, "fsync", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        ve.save(path)
    assert path.read_bytes() == before  # the old bundle is untouched
    assert os.listdir(path.parent) == [path.name]  # and no temp file is left behind


def test_save_into_missing_directory(tmp_path, shared_encoder):
    with pytest.raises(IGDSInputError, match="directory does not exist"):
        _make_ve(shared_encoder).save(tmp_path / "nope" / "ve.safetensors")


def _rewrite(path, out, header_edit=None, tensor_edit=None, metadata=None):
    """Copy a bundle with its header and/or tensors changed (a corrupt or foreign file)."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as bundle:
        header = json.loads(bundle.metadata()["igds_ve"])
    if header_edit:
        header_edit(header)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(out), metadata=metadata if metadata is not None else {"igds_ve": json.dumps(header)})
    return out


def _expect_load_error(path, match):
    with pytest.raises(IGDSInputError, match=match) as excinfo:
        VariationalEstimator.load(path)
    assert "\n" not in str(excinfo.value)


def test_load_missing_or_foreign_files(tmp_path, saved_bundle):
    _, path = saved_bundle
    _expect_load_error(tmp_path / "absent.safetensors", "VE bundle not found")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(torch.randint(0, 256, (256,), dtype=torch.uint8).tolist()))
    _expect_load_error(garbage, "not a readable safetensors file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-1000])
    _expect_load_error(truncated, "not a readable safetensors file")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.randn(3)}, str(foreign))
    _expect_load_error(foreign, "not an igds VE bundle")
    _expect_load_error(_rewrite(path, tmp_path / "badjson.safetensors", metadata={"igds_ve": "{nope"}), "not valid JSON")


def _set(key, value):
    return lambda header: header.__setitem__(key, value)


@pytest.mark.parametrize(
    "header_edit,match",
    [
        (_set("tau", 0.0), "tau must be a positive"),
        (_set("tau", -2.5), "tau must be a positive"),
        (_set("class_names", ["only", "three", "names"]), "3 class_names for 4 classes"),
        (_set("format_version", 99), "unsupported VE bundle format_version 99"),
        (_set("arch", "vgg16"), "unknown arch 'vgg16'"),
        (lambda header: header.update(num_classes=5, class_names=list("abcde")), r"classifier\.weight has shape \(4, 512\), header says \(5, 512\)"),
        (_set("feature_dim", 2048), "feature_dim 2048 does not match resnet18"),
        (_set("mean", [0.5]), "1 channels but std has 3"),
        (lambda header: header.pop("resolution"), r"lacks fields \['resolution'\]"),
    ],
)
def test_load_rejects_bad_header(tmp_path, saved_bundle, header_edit, match):
    _, path = saved_bundle
    _expect_load_error(_rewrite(path, tmp_path / "bad.safetensors", header_edit=header_edit), match)


def _replace(key, make):
    return lambda tensors: tensors.__setitem__(key, make(tensors[key]))


@pytest.mark.parametrize(
    "tensor_edit,match",
    [
        (_replace("classifier.bias", lambda t: torch.randn(7)), r"classifier\.bias has shape \(7,\)"),
        (_replace("log_centroids", lambda t: t.clone().index_fill_(1, torch.tensor([3]), float("nan"))), "non-finite"),
        (lambda tensors: tensors.pop("encoder.layer2.0.downsample.1.running_var"),
         r"missing keys: layer2\.0\.downsample\.1\.running_var"),
        (_replace("encoder.layer1.0.conv1.weight", lambda t: t[:, :, :2].contiguous()), r"shape mismatch.*layer1\.0\.conv1\.weight"),
        (lambda tensors: tensors.pop("log_centroids"), r"missing \['log_centroids'\]"),
        (lambda tensors: tensors.__setitem__("extra.tensor", torch.randn(2)), r"unexpected \['extra\.tensor'\]"),
    ],
)
def test_load_rejects_bad_tensors(tmp_path, saved_bundle, tensor_edit, match):
    _, path = saved_bundle
    _expect_load_error(_rewrite(path, tmp_path / "bad.safetensors", tensor_edit=tensor_edit), match)


# ---- class centroids ---------------------------------------------------------------------------


def _naive_log_centroids(features, labels, num_classes, tau):
    probabilities = torch.softmax(features.double() / tau, dim=1)
    return torch.stack([probabilities[labels == c].mean(0) for c in range(num_classes)]).log()


def _labels_covering(count, num_classes):
    return torch.arange(count)[torch.randperm(count)] % num_classes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_centroids_match_naive_float64(rng_seed, dtype):
    classes, tau = 5, float(torch.empty(()).uniform_(0.3, 2.0))
    features = (torch.randn(60, 24) * 2).to(dtype)
    labels = _labels_covering(60, classes)
    log_q = compute_log_centroids(features, labels, classes, tau)
    assert log_q.shape == (classes, 24) and log_q.dtype == dtype
    expected = _naive_log_centroids(features, labels, classes, tau)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(log_q.double(), expected, rtol=tolerance, atol=tolerance)
    # Each Q_y is a distribution over the d coordinates.
    torch.testing.assert_close(torch.logsumexp(log_q.double(), 1), torch.zeros(classes, dtype=torch.float64),
                               rtol=0, atol=10 * tolerance)


def test_log_centroids_stable_where_naive_underflows(rng_seed):
    classes, tau = 3, 0.01
    features = torch.randn(30, 16, dtype=torch.float64) * 20
    labels = _labels_covering(30, classes)
    assert torch.isinf(_naive_log_centroids(features, labels, classes, tau)).any()  # exp underflows to 0
    log_q = compute_log_centroids(features, labels, classes, tau)
    assert torch.isfinite(log_q).all()
    log_p = torch.log_softmax(features / tau, dim=1)
    expected = torch.stack(
        [torch.logsumexp(log_p[labels == c], 0) - torch.log(torch.tensor(float((labels == c).sum()), dtype=torch.float64))
         for c in range(classes)]
    )
    torch.testing.assert_close(log_q, expected, rtol=1e-12, atol=1e-10)


def test_streaming_equals_one_shot(rng_seed):
    classes, tau = 4, 0.7
    features = torch.randn(50, 12)
    labels = _labels_covering(50, classes)
    # Uneven batches in sorted-label order: some batches miss classes entirely.
    order = torch.argsort(labels)
    sizes = [7, 13, 1, 20, 9]
    batches = list(zip(torch.split(features[order], sizes), torch.split(labels[order], sizes)))
    streamed = accumulate_log_centroids(lambda x: x, batches, classes, tau)
    torch.testing.assert_close(streamed, compute_log_centroids(features, labels, classes, tau), rtol=1e-6, atol=1e-6)


def test_accumulate_over_encoder_batches(shared_encoder):
    ve = _make_ve(shared_encoder)
    images, labels = _images(batch=4, size=32), torch.tensor([0, 1, 2, 3])
    batches = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    seen = []

    def recording_features(x):
        z = ve.features(x)
        assert not z.requires_grad  # the helper runs the encoder without building graphs
        seen.append(z)
        return z

    streamed = accumulate_log_centroids(recording_features, batches, NUM_CLASSES, ve.tau)
    assert len(seen) == 2
    expected = compute_log_centroids(torch.cat(seen), labels, NUM_CLASSES, ve.tau)
    torch.testing.assert_close(streamed, expected, rtol=1e-6, atol=1e-6)


def test_log_centroid_input_errors():
    features = torch.randn(6, 8)
    with pytest.raises(IGDSInputError, match="class 2 has no samples"):
        compute_log_centroids(features, torch.tensor([0, 1, 0, 1, 3, 3]), 4, 1.0)
    with pytest.raises(IGDSInputError, match=r"labels must lie in \[0, 4\)"):
        compute_log_centroids(features, torch.tensor([0, 1, 2, 3, 4, 0]), 4, 1.0)
    with pytest.raises(IGDSInputError, match="integer"):
        compute_log_centroids(features, torch.rand(6), 4, 1.0)
    with pytest.raises(IGDSInputError, match=r"labels must have shape \(6,\)"):
        compute_log_centroids(features, torch.tensor([0, 1, 2]), 4, 1.0)
    with pytest.raises(IGDSInputError, match="tau"):
        compute_log_centroids(features, torch.tensor([0, 1, 2, 3, 0, 1]), 4, 0.0)
    with pytest.raises(IGDSInputError, match="non-finite"):
        compute_log_centroids(features.index_fill(0, torch.tensor([1]), float("inf")), torch.tensor([0, 1, 2, 3, 0, 1]), 4, 1.0)
    accumulator = LogCentroidAccumulator(2, 1.0)
    accumulator.update(torch.randn(3, 8), torch.tensor([0, 1, 0]))
    with pytest.raises(IGDSInputError, match="dim 5, earlier batches had 8"):
        accumulator.update(torch.randn(2, 5), torch.tensor([0, 1]))
