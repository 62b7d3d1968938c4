"""Evaluation protocol presets (igds / minimax), MinimaxDiffusion's colour jitter and lighting, and
the protocols in `evaluate_distilled` / `igds-fast eval`."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import igds_fast.evaluate.train as train_module
from igds_fast.cli import main
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate import evaluate_distilled
from igds_fast.evaluate.augment import (
    IMAGENET_PCA_EIGVAL,
    IMAGENET_PCA_EIGVEC,
    AugmentConfig,
    augment_batch,
    color_jitter,
    pca_lighting,
)
from igds_fast.evaluate.protocol import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalProtocol,
    NormalizedInput,
    igds_epochs,
    minimax_epochs,
    protocol_for,
)
from igds_fast.evaluate.train import _lr_factor


def _images(seed=0, shape=(5, 3, 6, 7)):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) * 2 - 1


def _reference_jitter(image01, order, amounts):
    """MinimaxDiffusion's Brightness / Contrast / Saturation on one [3, H, W] image in [0, 1],
    written as its misc/utils.py does (lerp towards zeros / mean grey / grey), in the given order."""
    out = image01.clone()
    for op in order:
        alpha = float(amounts[op])
        grey = out.clone()
        grey[0] = 0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2]
        grey[1] = grey[0]
        grey[2] = grey[0]
        if op == 0:
            target = torch.zeros_like(out)
        elif op == 1:
            target = torch.full_like(out, float(grey.mean()))
        else:
            target = grey
        out = out.lerp(target, alpha)
    return out


def test_color_jitter_matches_a_per_image_reference():
    images = _images()
    generator = torch.Generator().manual_seed(7)
    replay = torch.Generator().manual_seed(7)
    out = color_jitter(images, generator, 0.4)
    # The same draws, replayed: a permutation per image (argsort of uniforms), then the amounts.
    order = torch.argsort(torch.rand((5, 3), generator=replay), dim=1)
    amounts = torch.rand((5, 3), generator=replay) * 0.8 - 0.4
    for n in range(images.shape[0]):
        expected = _reference_jitter((images[n] + 1) / 2, order[n].tolist(), amounts[n]) * 2 - 1
        torch.testing.assert_close(out[n], expected, rtol=0, atol=2e-6)
    assert not torch.allclose(out, images)
    assert order.unique(dim=0).shape[0] > 1  # the orders do differ between images


def test_pca_lighting_matches_alexnet_formula():
    images = _images(1)
    out = pca_lighting(images, torch.Generator().manual_seed(3), 0.1)
    alpha = torch.randn((5, 3), generator=torch.Generator().manual_seed(3)) * 0.1
    eigvec = torch.tensor(IMAGENET_PCA_EIGVEC)
    eigval = torch.tensor(IMAGENET_PCA_EIGVAL)
    for n in range(5):
        rgb = (eigvec * alpha[n].view(1, 3) * eigval.view(1, 3)).sum(1)
        expected = ((images[n] + 1) / 2 + rgb.view(3, 1, 1)) * 2 - 1
        torch.testing.assert_close(out[n], expected, rtol=0, atol=1e-6)


def test_jitter_and_lighting_off_are_identity_and_refuse_grey_images():
    images = _images()
    assert color_jitter(images, torch.Generator(), 0.0) is images
    assert pca_lighting(images, torch.Generator(), 0.0) is images
    with pytest.raises(IGDSInputError, match="RGB"):
        color_jitter(images[:, :1], torch.Generator(), 0.4)
    with pytest.raises(IGDSInputError, match="color_jitter"):
        AugmentConfig(color_jitter=1.5)
    with pytest.raises(IGDSInputError, match="lighting_std"):
        AugmentConfig(lighting_std=-0.1)


def test_augment_batch_is_seeded_and_default_unchanged():
    images = _images(2, (4, 3, 8, 8))
    labels = torch.arange(4)
    minimax = protocol_for("minimax", 10).augment
    first = augment_batch(images, labels, torch.Generator().manual_seed(5), minimax)
    again = augment_batch(images, labels, torch.Generator().manual_seed(5), minimax)
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    plain = augment_batch(images, labels, torch.Generator().manual_seed(5), AugmentConfig())
    assert not torch.allclose(first[0], plain[0])  # jitter / lighting do act
    # The IGDS protocol's draws are untouched by the new options (they default to off).
    assert AugmentConfig() == AugmentConfig(color_jitter=0.0, lighting_std=0.0)


def test_epoch_tables():
    assert [igds_epochs(i) for i in (1, 10, 20, 50, 100)] == [2000, 2000, 1500, 1500, 1000]
    # MinimaxDiffusion's ipc_epoch(ipc, factor=1, nclass).
    assert [minimax_epochs(i, 10) for i in (1, 10, 20, 50, 100, 200, 500, 1000)] == [
        3000, 2000, 1500, 1500, 1000, 1000, 500, 300]
    assert minimax_epochs(10, 100) == 1300  # int(2/3 * 2000) = 1333, rounded down to a multiple of 100
    assert minimax_epochs(50, 100) == 1000
    with pytest.raises(IGDSInputError):
        minimax_epochs(0, 10)


def test_protocol_presets():
    igds = protocol_for("igds", 10)
    assert (igds.optimizer, igds.lr, igds.schedule, igds.normalize_mean) == ("adam", 0.01, "constant", None)
    minimax = protocol_for("minimax", 10)
    assert (minimax.optimizer, minimax.lr, minimax.momentum, minimax.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (minimax.schedule, minimax.batch_size, minimax.best_checkpoints) == ("step", 64, 100)
    assert minimax.augment.color_jitter == 0.4 and minimax.augment.lighting_std == 0.1
    assert minimax.epochs(10, 10) == 2000 and igds.epochs(1, 10) == 2000 and minimax.epochs(1, 10) == 3000
    large = protocol_for("minimax", 1000)
    assert (large.lr, large.weight_decay, large.batch_size) == (0.1, 1e-4, 128)
    assert minimax.to_dict()["augment"]["color_jitter"] == 0.4
    with pytest.raises(IGDSInputError, match="unknown evaluation protocol 'dsa'"):
        protocol_for("dsa", 10)
    with pytest.raises(IGDSInputError, match="RGB"):
        protocol_for("minimax", 10, channels=1)
    with pytest.raises(IGDSInputError, match="optimizer"):
        EvalProtocol(name="x", optimizer="lamb")
    with pytest.raises(IGDSInputError, match="together"):
        EvalProtocol(name="x", normalize_mean=(0.5,))


def test_normalized_input_is_imagenet_normalisation_of_unit_images():
    torch.manual_seed(0)
    inner = torch.nn.Conv2d(3, 2, 1)
    model = NormalizedInput(inner, IMAGENET_MEAN, IMAGENET_STD)
    x = _images(4)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), inner(((x + 1) / 2 - mean) / std), rtol=1e-5, atol=1e-6)
    assert not any(name in model.state_dict() for name in ("scale", "shift"))


# ------------------------------------------------------------------ the protocol in training


def _rgb_sets(seed, per_class=2, test_per_class=4, size=16, classes=3):
    """Random 3-channel sets in [-1, 1]: class = which channel is brighter (learnable, tiny)."""
    generator = torch.Generator().manual_seed(seed)

    def make(count):
        labels = torch.arange(classes).repeat_interleave(count)
        images = torch.rand(len(labels), 3, size, size, generator=generator) * 1.2 - 1.0
        images[torch.arange(len(labels)), labels % 3] += 0.8
        return images.clamp(-1, 1), labels

    return (*make(per_class), *make(test_per_class))


def _normalise(images):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


class _Recorder(torch.nn.Module):
    """A tiny network that keeps every input it sees, split by train / eval mode."""

    def __init__(self, log):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 3))
        self.log = log

    def forward(self, x):
        self.log["train" if self.training else "eval"].append(x.detach().clone())
        return self.net(x)


@pytest.mark.parametrize("epochs", [3, 7, 12, 100, 2000])
def test_step_schedule_is_minimax_multisteplr(epochs):
    """schedule "step" = MinimaxDiffusion's MultiStepLR([2E//3, 5E//6], 0.2) stepped once per epoch."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2 * epochs // 3, 5 * epochs // 6], gamma=0.2)
    for epoch in range(epochs):
        expected = optimizer.param_groups[0]["lr"]
        # The factor is constant within an epoch whatever the step index (2 steps per epoch here).
        for step in (2 * epoch, 2 * epoch + 1):
            assert _lr_factor("step", step, 2 * epochs, epoch, epochs) == pytest.approx(expected, rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_minimax_trains_with_sgd_step_schedule_and_normalised_inputs(monkeypatch):
    train_x, train_y, test_x, test_y = _rgb_sets(0)
    created, steps = [], []

    class RecordingSGD(torch.optim.SGD):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

        def step(self, closure=None):
            group = self.param_groups[0]
            steps.append((group["lr"], group["momentum"], group["weight_decay"]))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    log = {"train": [], "eval": []}
    plain = AugmentConfig(random_resized_crop=False, horizontal_flip=False, cutmix_prob=0.0)
    result = evaluate_distilled(train_x, train_y, test_x, test_y, network=lambda: _Recorder(log), epochs=12,
                                seeds=1, device="cpu", protocol="minimax", augment=plain)
    assert len(created) == 1
    # Full batch of 6 (min(64, 6)): one step per epoch; x0.2 from epoch 8 (2*12//3), again from 10 (5*12//6).
    expected_lrs = [0.01] * 8 + [0.002] * 2 + [0.0004] * 2
    assert [lr for lr, _, _ in steps] == pytest.approx(expected_lrs, rel=1e-12)
    assert {(m, wd) for _, m, wd in steps} == {(0.9, 5e-4)}
    # The network sees ImageNet-normalised images in training (augment off here) and in every test.
    assert len(log["train"]) == 12
    for seen in log["train"]:
        torch.testing.assert_close(seen, _normalise(train_x), rtol=1e-5, atol=1e-5)
    # best_checkpoints 100 -> every max(1, 12 // 100) = 1 epoch: 11 checkpoints + the final measurement.
    assert len(log["eval"]) == 12 and result["best_every_epochs"] == 1
    for seen in log["eval"]:
        torch.testing.assert_close(seen, _normalise(test_x), rtol=1e-5, atol=1e-5)
    assert (result["optimizer"], result["momentum"], result["weight_decay"], result["schedule"]) == ("sgd", 0.9, 5e-4, "step")
    assert result["normalize"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert result["protocol"]["name"] == "minimax" and result["protocol"]["augment"]["color_jitter"] == 0.4
    assert result["augment"] == plain.to_dict() and set(result["overrides"]) == {"epochs", "augment"}


def test_igds_default_uses_adam_and_raw_inputs(monkeypatch):
    train_x, train_y, test_x, test_y = _rgb_sets(1)
    monkeypatch.setattr(torch.optim, "SGD", None)  # the igds protocol must not touch SGD
    log = {"train": [], "eval": []}
    plain = AugmentConfig(random_resized_crop=False, horizontal_flip=False, cutmix_prob=0.0)
    result = evaluate_distilled(train_x, train_y, test_x, test_y, network=lambda: _Recorder(log), epochs=3,
                                seeds=1, device="cpu", augment=plain)
    torch.testing.assert_close(log["train"][0], train_x, rtol=0, atol=0)
    torch.testing.assert_close(log["eval"][0], test_x, rtol=0, atol=0)
    assert len(log["eval"]) == 1 and "best_accuracies" not in result and "best_mean" not in result
    assert result["protocol"]["name"] == "igds" and result["optimizer"] == "adam" and result["normalize"] is None
    assert set(result["overrides"]) == {"epochs", "augment"}


def test_explicit_igds_equals_default_and_explicit_arguments_override():
    train_x, train_y, test_x, test_y = _rgb_sets(2)
    settings = dict(network="convnet3", epochs=4, seeds=2, width=8, device="cpu")
    default = evaluate_distilled(train_x, train_y, test_x, test_y, **settings)
    explicit = evaluate_distilled(train_x, train_y, test_x, test_y, protocol="igds", **settings)
    same_values = evaluate_distilled(train_x, train_y, test_x, test_y, lr=0.01, schedule="constant", weight_decay=0.0,
                                     augment=AugmentConfig(), **settings)
    assert default["accuracies"] == explicit["accuracies"] == same_values["accuracies"]
    assert {k: v for k, v in default.items() if k != "seconds"} == {k: v for k, v in explicit.items() if k != "seconds"}
    overridden = evaluate_distilled(train_x, train_y, test_x, test_y, protocol="minimax", lr=0.05, schedule="cosine",
                                    weight_decay=0.0, batch_size=4, **settings)
    assert (overridden["lr"], overridden["schedule"], overridden["weight_decay"], overridden["batch_size"]) == (
        0.05, "cosine", 0.0, 4)
    assert overridden["overrides"] == {"lr": 0.05, "schedule": "cosine", "weight_decay": 0.0, "batch_size": 4, "epochs": 4}
    assert overridden["protocol"]["lr"] == 0.01 and overridden["optimizer"] == "sgd"  # the preset as defined


def test_minimax_best_over_checkpoints(monkeypatch):
    train_x, train_y, test_x, test_y = _rgb_sets(3)
    settings = dict(network="convnet3", epochs=6, seeds=2, width=8, device="cpu")
    result = evaluate_distilled(train_x, train_y, test_x, test_y, protocol="minimax", **settings)
    assert len(result["best_accuracies"]) == 2
    assert all(best >= last for best, last in zip(result["best_accuracies"], result["accuracies"]))
    assert result["best_mean"] == pytest.approx(float(np.mean(result["best_accuracies"])))
    assert result["best_std"] == pytest.approx(float(np.std(result["best_accuracies"])))
    assert result["mean"] == pytest.approx(float(np.mean(result["accuracies"])))  # the headline: last epoch
    assert "last epoch" in result["accuracy_definitions"]["accuracies"]
    assert "best" in result["accuracy_definitions"]["best_accuracies"]
    json.dumps(result)
    # Measuring at checkpoints draws no random numbers: the training trajectory is unchanged.
    without = dataclasses.replace(protocol_for("minimax", 3), best_checkpoints=0)
    plain = evaluate_distilled(train_x, train_y, test_x, test_y, protocol=without, **settings)
    assert plain["accuracies"] == result["accuracies"] and "best_accuracies" not in plain


def test_minimax_epochs_default_from_its_table(monkeypatch):
    recorded = []
    original = train_module.train_one_seed

    def short(factory, x, y, epochs, *args, **kwargs):
        recorded.append((epochs, kwargs["checkpoint_every"]))
        return original(factory, x, y, 1, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_seed", short)
    for per_class, protocol, epochs, every in ((1, "minimax", 3000, 30), (2, "minimax", 2000, 20), (1, "igds", 2000, 0)):
        train_x, train_y, test_x, test_y = _rgb_sets(4, per_class=per_class, size=8)
        result = evaluate_distilled(train_x, train_y, test_x, test_y, network="convnet3", seeds=1, width=4,
                                    device="cpu", protocol=protocol)
        assert result["epochs"] == epochs and recorded[-1] == (epochs, every)
        assert "epochs" not in result["overrides"]


def test_protocol_refusals():
    train_x, train_y, test_x, test_y = _rgb_sets(5, size=8)
    grey = (train_x[:, :1], train_y, test_x[:, :1], test_y)
    with pytest.raises(IGDSInputError, match="RGB"):
        evaluate_distilled(*grey, network="convnet3", epochs=1, seeds=1, width=4, device="cpu", protocol="minimax")
    with pytest.raises(IGDSInputError, match="RGB"):  # jitter / lighting asked for grey images
        evaluate_distilled(*grey, network="convnet3", epochs=1, seeds=1, width=4, device="cpu",
                           augment=AugmentConfig(color_jitter=0.4))
    odd = EvalProtocol(name="custom", normalize_mean=(0.5,), normalize_std=(0.5,))
    with pytest.raises(IGDSInputError, match="normalises 1 channel"):
        evaluate_distilled(train_x, train_y, test_x, test_y, network="convnet3", epochs=1, width=4, protocol=odd)
    with pytest.raises(IGDSInputError, match="unknown evaluation protocol"):
        evaluate_distilled(train_x, train_y, test_x, test_y, network="convnet3", epochs=1, width=4, protocol="dsa")
    with pytest.raises(IGDSInputError, match="momentum"):
        EvalProtocol(name="custom", momentum=0.9)


def _write_rgb_folder(root, per_class, rng, size=16):
    for name, colour in {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}.items():
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            noise = rng.integers(-40, 41, size=(size, size, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(root / name / f"{index}.png")


def test_minimax_measures_a_streamed_folder_like_the_tensor(tmp_path, monkeypatch):
    from igds_fast.data import FolderImages, load_image_folder

    monkeypatch.setenv("IGDS_DATA_WORKERS", "0")
    _write_rgb_folder(tmp_path / "val", 4, np.random.default_rng(0), size=12)
    images, labels, _, _ = load_image_folder(tmp_path / "val", 12)
    streamed = FolderImages(tmp_path / "val", 12, in_memory=False)
    settings = dict(network="convnet3", epochs=3, seeds=1, width=4, device="cpu", protocol="minimax")
    held = evaluate_distilled(images[::4], labels[::4], images, labels, **settings)
    read = evaluate_distilled(images[::4], labels[::4], streamed, None, **settings)
    assert read["accuracies"] == held["accuracies"] and read["best_accuracies"] == held["best_accuracies"]


def test_cli_eval_protocol_minimax_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _write_rgb_folder(tmp_path / "distilled", 2, rng)
    _write_rgb_folder(tmp_path / "val", 3, rng)
    out = tmp_path / "results.json"
    code = main(["eval", "--train", str(tmp_path / "distilled"), "--val", str(tmp_path / "val"),
                 "--network", "convnet3", "--seeds", "2", "--epochs", "4", "--width", "8", "--lr", "0.02",
                 "--protocol", "minimax", "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["protocol"] == json.loads(json.dumps(protocol_for("minimax", 3).to_dict()))
    assert results["overrides"] == {"lr": 0.02, "epochs": 4} and results["lr"] == 0.02
    assert results["optimizer"] == "sgd" and results["normalize"]["mean"] == list(IMAGENET_MEAN)
    assert len(results["best_accuracies"]) == 2 and results["augment"]["lighting_std"] == 0.1
    assert "protocol: minimax (sgd lr 0.02 momentum 0.9" in printed and "overridden: epochs, lr" in printed
    assert "best-checkpoint accuracy" in printed and f"{results['best_mean']:.2f}" in printed
    # --no-flip changes only the flip of the protocol's augmentations (jitter / lighting stay on).
    code = main(["eval", "--train", str(tmp_path / "distilled"), "--val", str(tmp_path / "val"),
                 "--network", "convnet3", "--seeds", "1", "--epochs", "1", "--width", "8", "--no-flip",
                 "--protocol", "minimax", "--out", str(out), "--quiet", "--device", "cpu"])
    assert code == 0
    results = json.loads(out.read_text())
    no_flip = dataclasses.replace(protocol_for("minimax", 3).augment, horizontal_flip=False)
    assert results["augment"] == json.loads(json.dumps(no_flip.to_dict()))
    assert "augment" in results["overrides"]


def test_cli_eval_protocol_minimax_refuses_grey(tmp_path, capsys):
    rng = np.random.default_rng(1)
    _write_rgb_folder(tmp_path / "d", 1, rng)
    out = tmp_path / "r.json"
    code = main(["eval", "--train", str(tmp_path / "d"), "--val", str(tmp_path / "d"), "--network", "convnet3",
                 "--channels", "1", "--protocol", "minimax", "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("igds-fast: error: ") and "RGB" in err and err.count("\n") == 1
    assert not out.exists()
