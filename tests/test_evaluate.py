"""Evaluation harness: networks, augmentations, the training protocol and the `igds-fast eval` CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from igds_fast.cli import main
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate import AugmentConfig, build_eval_network, epochs_for_ipc, evaluate_distilled
from igds_fast.evaluate.augment import crop_and_flip, cutmix, random_horizontal_flip, sample_beta
from igds_fast.evaluate.networks import ConvNet


# ------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize(
    "name, channels, size",
    [("convnet3", 3, 16), ("convnet4", 1, 16), ("convnet5", 3, 32), ("convnet6", 3, 64),
     ("resnet_ap10", 3, 16), ("resnet_ap10", 1, 96), ("resnet18_in", 3, 16), ("resnet18_in", 3, 96)],
)
def test_network_output_shapes(name, channels, size, rng_seed):
    network = build_eval_network(name, in_channels=channels, num_classes=7, image_size=size)
    logits = network(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[0], logits[1])  # inputs matter (no constant output)


def test_large_stems_output_shapes(rng_seed):
    for name in ("resnet_ap10", "resnet18_in"):
        network = build_eval_network(name, 3, 5, 144)
        assert network(torch.randn(1, 3, 144, 144)).shape == (1, 5)


def test_convnet_structure_matches_protocol():
    network = build_eval_network("convnet6", 3, 10, 256)
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in network.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(convs) == 6 and all(c.out_channels == 128 and c.kernel_size == (3, 3) for c in convs)
    assert all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)
    assert network.classifier.in_features == 128 * 4 * 4  # 256 / 2^6 = 4
    assert build_eval_network("convnet4", 3, 10, 64).classifier.in_features == 128 * 4 * 4


def test_network_size_and_name_errors():
    with pytest.raises(IGDSInputError, match="ConvNet-6 needs image_size >= 64"):
        build_eval_network("convnet6", 3, 10, 32)
    ConvNet(3, 10, 8, depth=3)  # 8 / 2^3 = 1 pixel is still allowed
    with pytest.raises(IGDSInputError, match="resnet_ap10"):
        build_eval_network("resnet_ap10", 3, 10, 8)
    with pytest.raises(IGDSInputError, match="unknown network"):
        build_eval_network("vgg11", 3, 10, 32)
    with pytest.raises(IGDSInputError, match="depth"):
        build_eval_network("convnet7", 3, 10, 256)


# ------------------------------------------------------------------------------------ augment
def _generator(seed):
    return torch.Generator().manual_seed(seed)


def test_crop_and_flip_shapes_and_determinism(rng_seed):
    images = torch.rand(6, 3, 12, 12) * 2 - 1
    first = crop_and_flip(images, _generator(rng_seed))
    again = crop_and_flip(images, _generator(rng_seed))
    other = crop_and_flip(images, _generator(rng_seed + 1))
    assert first.shape == images.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.allclose(first, images)
    assert first.min() >= images.min() - 1e-6 and first.max() <= images.max() + 1e-6  # bilinear: convex


def test_full_crop_without_flip_is_identity(rng_seed):
    images = torch.rand(4, 1, 9, 9)
    out = crop_and_flip(images, _generator(rng_seed), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)
    assert crop_and_flip(images, _generator(0), crop=False, flip=False) is images


def test_flip_only_gives_exact_mirrors(rng_seed):
    images = torch.rand(32, 3, 5, 7)
    for out in (crop_and_flip(images, _generator(rng_seed), crop=False),
                random_horizontal_flip(images, _generator(rng_seed))):
        mirrored = torch.isclose(out, images.flip(-1), atol=1e-5).flatten(1).all(1)
        same = torch.isclose(out, images, atol=1e-5).flatten(1).all(1)
        assert torch.all(mirrored | same)
        assert mirrored.any() and same.any()


def test_crop_scale_bounds_zoom(rng_seed):
    # A horizontal ramp: a crop covering at least half the area spans at least sqrt(0.5)*3/4 of the
    # width in the most elongated case, so each output row's range stays well above a narrow crop's.
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(16, 1, 32, 32).contiguous()
    out = crop_and_flip(ramp, _generator(rng_seed), flip=False)
    spans = (out[:, 0, :, -1] - out[:, 0, :, 0]).mean(dim=1)
    assert torch.all(spans > 2 * 0.5)  # ramp spans 2; crop width fraction >= ~0.61
    assert torch.all(spans <= 2 + 1e-5)


def test_cutmix_box_and_label_weights(rng_seed):
    batch = 8
    images = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, 16, 16).clone()
    labels = torch.arange(batch) % 3
    mixed, labels_a, labels_b, kept = cutmix(images, labels, _generator(rng_seed))
    again = cutmix(images, labels, _generator(rng_seed))
    assert torch.equal(mixed, again[0]) and torch.equal(labels_b, again[2])
    assert mixed.shape == images.shape and torch.equal(labels_a, labels)
    for i in range(batch):
        original = mixed[i] == i
        # Every pixel is from the image itself or from one partner, and the kept fraction matches.
        kept_fraction = original.float().mean().item()
        partner_values = mixed[i][~original].unique()
        assert partner_values.numel() <= 1
        if partner_values.numel() == 1:
            partner = int(partner_values.item())
            assert labels_b[i] == labels[partner]
            assert kept_fraction == pytest.approx(float(kept), abs=1e-6)
    assert 0.0 <= float(kept) <= 1.0


def test_cutmix_probability_zero_leaves_batch(rng_seed):
    images = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0])
    mixed, _, _, kept = cutmix(images, labels, _generator(rng_seed), prob=0.0)
    assert torch.equal(mixed, images) and float(kept) == 1.0


def test_beta_sampler_moments(rng_seed):
    generator = _generator(rng_seed)
    for alpha in (0.5, 1.0, 2.0):
        draws = sample_beta(alpha, generator, size=20000)
        assert draws.min() >= 0 and draws.max() <= 1
        assert float(draws.mean()) == pytest.approx(0.5, abs=0.015)
        assert float(draws.var()) == pytest.approx(1.0 / (4.0 * (2.0 * alpha + 1.0)), rel=0.08)


# ---------------------------------------------------------------------------------- protocol
def test_epochs_by_ipc():
    assert [epochs_for_ipc(i) for i in (1, 10, 20, 50, 100)] == [2000, 2000, 1500, 1500, 1000]
    with pytest.raises(IGDSInputError):
        epochs_for_ipc(0)


def _blobs(per_class, size, generator, num_classes=3):
    """Classes = a bright square in a class-specific quadrant, plus noise."""
    images = torch.rand(per_class * num_classes, 1, size, size, generator=generator) * 0.6 - 1.0
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    half = size // 2
    for index, label in enumerate(labels.tolist()):
        top, left = (label // 2) * half, (label % 2) * half
        images[index, :, top : top + half, left : left + half] += 1.2
    return images.clamp(-1, 1), labels


def test_evaluate_distilled_learns_and_is_deterministic(rng_seed):
    generator = torch.Generator().manual_seed(rng_seed)
    train_x, train_y = _blobs(2, 8, generator)
    test_x, test_y = _blobs(20, 8, generator)
    settings = dict(network="convnet3", epochs=25, seeds=2, width=16, device="cpu",
                    augment=AugmentConfig(horizontal_flip=False))
    threads_before = torch.get_num_threads()
    first = evaluate_distilled(train_x, train_y, test_x, test_y, **settings)
    second = evaluate_distilled(train_x, train_y, test_x, test_y, **settings)
    assert torch.get_num_threads() == threads_before  # the small-work thread policy is undone
    assert first["threads"] == 1
    assert first["accuracies"] == second["accuracies"]
    assert first["ipc"] == 2 and first["epochs"] == 25 and first["seeds"] == [0, 1]
    assert first["mean"] > 60.0  # chance is 33%
    assert first["std"] == pytest.approx(float(np.std(first["accuracies"])))
    json.dumps(first)  # serialisable as is


def test_measure_accuracy_streams_a_folder_like_the_tensor(tmp_path, rng_seed, monkeypatch):
    """A streamed FolderImages test set gives the tensor path's accuracy (same batches, same logits)."""
    from igds_fast.data import FolderImages, load_image_folder
    from igds_fast.evaluate import measure_accuracy

    monkeypatch.setenv("IGDS_DATA_WORKERS", "0")
    _write_colour_folder(tmp_path / "val", 4, np.random.default_rng(rng_seed))
    images, labels, _, _ = load_image_folder(tmp_path / "val", 12)
    streamed = FolderImages(tmp_path / "val", 12, in_memory=False)
    torch.manual_seed(rng_seed)
    model = build_eval_network("convnet3", 3, 3, 12, width=8)
    for batch_size in (5, 500):
        expected = measure_accuracy(model, images, labels, batch_size=batch_size)
        assert measure_accuracy(model, streamed, None, batch_size=batch_size, device="cpu") == expected
    epochs_seen = []
    result = evaluate_distilled(images[::4], labels[::4], streamed, None, network="convnet3", epochs=2, seeds=1,
                                width=8, device="cpu", on_epoch=lambda *args: epochs_seen.append(args))
    assert result["test_size"] == 12 and epochs_seen == [(0, 1, 2), (0, 2, 2)]


def test_evaluate_distilled_minibatch_and_schedules(rng_seed):
    generator = torch.Generator().manual_seed(rng_seed)
    train_x, train_y = _blobs(4, 8, generator)
    test_x, test_y = _blobs(5, 8, generator)
    for schedule in ("step", "cosine"):
        result = evaluate_distilled(train_x, train_y, test_x, test_y, network="convnet3", epochs=3,
                                    seeds=1, width=8, batch_size=5, schedule=schedule, device="cpu")
        assert result["batch_size"] == 5 and result["schedule"] == schedule
        assert 0.0 <= result["mean"] <= 100.0


@pytest.mark.parametrize("batch_size", [12, 5])  # full batch (converted whole each step) and minibatches
def test_a_uint8_set_trains_and_tests_as_its_float_form(rng_seed, batch_size):
    """A set held as uint8 (4x smaller; each batch converted as x / 127.5 - 1) trains the same weights,
    bit for bit, as its float form under the minimax recipe's augmentations (crop, flip, jitter,
    lighting, CutMix), and tests the same."""
    from igds_fast.data import uint8_to_unit_range
    from igds_fast.evaluate import measure_accuracy
    from igds_fast.evaluate.protocol import protocol_for
    from igds_fast.evaluate.train import train_one_seed

    generator = torch.Generator().manual_seed(rng_seed)
    train_u8 = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=generator)
    train_y = torch.arange(12) % 3
    recipe = protocol_for("minimax", 3, 3)

    def trained(images):
        return train_one_seed(lambda: build_eval_network("convnet3", 3, 3, 16, width=8), images, train_y, 2, rng_seed,
                              0.01, batch_size, "cosine", recipe.augment, 5e-4, torch.device("cpu"), optimizer="sgd",
                              momentum=0.9)

    from_u8, from_float = trained(train_u8), trained(uint8_to_unit_range(train_u8))
    for (name, a), (_, b) in zip(from_u8.state_dict().items(), from_float.state_dict().items()):
        assert torch.equal(a, b), name
    test_u8 = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8, generator=generator)
    test_y = torch.arange(9) % 3
    assert measure_accuracy(from_u8, test_u8, test_y, batch_size=4) == measure_accuracy(
        from_u8, uint8_to_unit_range(test_u8), test_y, batch_size=4)


def test_evaluate_distilled_input_errors(rng_seed):
    train_x, train_y = torch.rand(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    test_x, test_y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    with pytest.raises(IGDSInputError, match="shape"):
        evaluate_distilled(train_x, train_y, torch.rand(4, 3, 8, 8), test_y, network="convnet3")
    with pytest.raises(IGDSInputError, match="no images of class"):
        evaluate_distilled(train_x, train_y, test_x, torch.tensor([0, 1, 3, 0]), network="convnet3")
    with pytest.raises(IGDSInputError, match="schedule"):
        evaluate_distilled(train_x, train_y, test_x, test_y, network="convnet3", schedule="linear")
    with pytest.raises(IGDSInputError, match="ConvNet-6"):
        evaluate_distilled(train_x, train_y, test_x, test_y, network="convnet6")


# --------------------------------------------------------------------------------------- CLI
_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def _write_colour_folder(root, per_class, rng, skip=()):
    for name, colour in _COLOURS.items():
        if name in skip:
            continue
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            noise = rng.integers(-40, 41, size=(20, 20, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:03d}.png")


def test_cli_eval_end_to_end(tmp_path, capsys, rng_seed):
    rng = np.random.default_rng(rng_seed)
    distilled, val = tmp_path / "distilled", tmp_path / "val"
    _write_colour_folder(distilled, 2, rng)
    _write_colour_folder(val, 5, rng)
    (val / "yellow").mkdir()  # an extra validation class is ignored
    Image.fromarray(np.full((20, 20, 3), 230, dtype=np.uint8)).save(val / "yellow" / "0.png")
    out = tmp_path / "results.json"
    code = main(["eval", "--train", str(distilled), "--val", str(val), "--network", "convnet3",
                 "--seeds", "2", "--epochs", "15", "--image-size", "16", "--width", "32",
                 "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "convnet3" in printed and "±" in printed and "accuracy" in printed
    results = json.loads(out.read_text())
    assert results["classes"] == ["blue", "green", "red"]
    assert results["ipc"] == 2 and results["num_classes"] == 3 and results["test_size"] == 15
    assert len(results["accuracies"]) == 2
    assert results["mean"] > 60.0
    assert results["settings"]["training"]["width"] == 32 and results["settings"]["image_size"] == 16
    assert f"{results['mean']:.2f}" in printed
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_eval_missing_val_class_exits_2(tmp_path, capsys, rng_seed):
    rng = np.random.default_rng(rng_seed)
    _write_colour_folder(tmp_path / "distilled", 1, rng)
    _write_colour_folder(tmp_path / "val", 1, rng, skip=("green",))
    code = main(["eval", "--train", str(tmp_path / "distilled"), "--val", str(tmp_path / "val"),
                 "--network", "convnet3", "--epochs", "1", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("igds-fast: error: ") and "'green'" in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()


def test_cli_eval_bad_network_exits_2(tmp_path, capsys, rng_seed):
    rng = np.random.default_rng(rng_seed)
    _write_colour_folder(tmp_path / "d", 1, rng)
    code = main(["eval", "--train", str(tmp_path / "d"), "--val", str(tmp_path / "d"), "--network", "convnet6"])
    assert code == 2 and "ConvNet-6" in capsys.readouterr().err


def test_cli_requires_subcommand(capsys):
    # argparse's usage errors are one-line IGDSInputErrors: exit code 2, no SystemExit.
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "required: COMMAND" in err and err.count("\n") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_and_training_on_cuda_are_deterministic(rng_seed):
    images = torch.rand(8, 3, 16, 16, device="cuda") * 2 - 1
    labels = torch.arange(8, device="cuda") % 2
    gen = lambda: torch.Generator(device="cuda").manual_seed(rng_seed)  # noqa: E731
    first = crop_and_flip(images, gen())
    assert first.device.type == "cuda" and torch.equal(first, crop_and_flip(images, gen()))
    mixed, _, partner, kept = cutmix(images, labels, gen())
    again = cutmix(images, labels, gen())
    assert torch.equal(mixed, again[0]) and torch.equal(partner, again[2]) and kept.device.type == "cuda"
    generator = torch.Generator().manual_seed(rng_seed)
    train_x, train_y = _blobs(2, 8, generator)
    test_x, test_y = _blobs(10, 8, generator)
    result = evaluate_distilled(train_x, train_y, test_x, test_y, network="convnet3", epochs=20,
                                seeds=1, width=16, device="cuda", augment=AugmentConfig(horizontal_flip=False))
    assert result["device"].startswith("cuda") and result["mean"] > 50.0
