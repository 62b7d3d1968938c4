"""Streamed ImageFolders: the held and streamed paths give the same batches and the same results
(train-ve, calibrate-beta, eval), corrupt files, the in-memory cap, train-ve's epoch checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from igds_fast import cli
from igds_fast.cli import main
from igds_fast.data import IN_MEMORY_ENV, FolderImages, in_memory_limit_bytes, load_image_folder
from igds_fast.errors import IGDSInputError
from igds_fast.train_ve import VETrainConfig, image_statistics, train_ve_from_source
from igds_fast.train_ve.moco import MoCoTrainer
from igds_fast.ve import VariationalEstimator

_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
QUIET = dict(log=lambda message: None)


def _write_folder(root, per_class, rng, size=(24, 20)):
    """Noisy colour classes as JPEGs that are not square (the resize + crop runs)."""
    for name, colour in _COLOURS.items():
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            noise = rng.integers(-50, 51, size=(size[1], size[0], 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:03d}.jpg", quality=90)
    return root


@pytest.fixture
def sets(tmp_path, rng_seed, monkeypatch):
    monkeypatch.setenv("IGDS_DATA_WORKERS", "0")  # decode in-process: no worker start-up per pass
    rng = np.random.default_rng(rng_seed)
    return {name: _write_folder(tmp_path / name, count, rng) for name, count in (("train", 10), ("val", 6), ("distilled", 2))}


def _streamed(monkeypatch, on: bool):
    """Force the streamed path with a cap of 0 MiB; the default cap holds these tiny sets."""
    if on:
        monkeypatch.setenv(IN_MEMORY_ENV, "0")
    else:
        monkeypatch.delenv(IN_MEMORY_ENV, raising=False)


# ---- FolderImages -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_held_and_load_image_folder(sets, workers):
    root = sets["train"]
    bad = root / "green" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    reference, labels, names, report = load_image_folder(root, 16, as_uint8=True)
    held = FolderImages(root, 16, in_memory=True, num_workers=workers)
    streamed = FolderImages(root, 16, in_memory=False, num_workers=workers)
    assert held.in_memory and not streamed.in_memory
    for source in (held, streamed):
        assert source.class_names == names and torch.equal(source.labels, labels)
        assert source.report.num_skipped_corrupt == 1 and source.report.skipped_paths == [str(bad)]
        assert source.report.images_per_class == report.images_per_class
        order = [[5, 0, 29], list(range(1, 5)), list(range(6, 29))]
        got = list(source.uint8_batches(order))
        for index, (images, batch_labels, indices) in zip(order, got):
            assert indices.tolist() == index
            assert torch.equal(images, reference[index]) and torch.equal(batch_labels, labels[index])
        (floats, _, _), = list(source.batches([[3, 7]], "cpu"))
        assert floats.dtype == torch.float32 and torch.equal(floats, reference[[3, 7]].float() / 127.5 - 1)
        assert torch.equal(source.gather([8, 2]), reference[[8, 2]].float() / 127.5 - 1)
    # Exact integer statistics: identical on both paths, and the float computation agrees closely.
    assert held.image_statistics() == streamed.image_statistics()
    mean, std = streamed.image_statistics()
    float_mean, float_std = image_statistics(reference.float() / 127.5 - 1)
    np.testing.assert_allclose(mean, float_mean, rtol=1e-6)
    np.testing.assert_allclose(std, float_std, rtol=1e-5)
    assert held.fingerprint() == streamed.fingerprint()

    with pytest.raises(IGDSInputError, match="broken.jpg") as info:
        FolderImages(root, 16, on_corrupt="fail", in_memory=False, num_workers=workers)
    assert "\n" not in str(info.value)


def test_in_memory_cap_from_the_environment(sets, monkeypatch):
    monkeypatch.setenv(IN_MEMORY_ENV, "0")
    assert in_memory_limit_bytes() == 0 and not FolderImages(sets["val"], 8).in_memory
    monkeypatch.setenv(IN_MEMORY_ENV, "0.001")  # 1048 bytes: 18 images of 3x8x8 = 3456 bytes do not fit
    assert not FolderImages(sets["val"], 8).in_memory
    monkeypatch.setenv(IN_MEMORY_ENV, "0.01")
    assert FolderImages(sets["val"], 8).in_memory
    monkeypatch.setenv(IN_MEMORY_ENV, "lots")
    with pytest.raises(IGDSInputError, match=IN_MEMORY_ENV):
        FolderImages(sets["val"], 8)
    streamed = FolderImages(sets["val"], 8, in_memory=False)
    with pytest.raises(IGDSInputError, match="streamed"):
        streamed.as_float_tensor()


def test_a_class_with_only_corrupt_files_is_an_error_when_streamed(sets):
    for path in (sets["distilled"] / "red").iterdir():
        path.write_bytes(b"nope")
    with pytest.raises(IGDSInputError, match="'red'.*no readable images"):
        FolderImages(sets["distilled"], 8, in_memory=False)


# ---- FolderImages.from_paths ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_path_list_gives_the_folders_batches_bit_for_bit(sets, workers):
    root = sets["train"]
    whole = FolderImages(root, 16, in_memory=False, num_workers=workers)
    order = [[5, 0, 29], list(range(1, 5)), list(range(6, 29))]
    reference = list(whole.uint8_batches(order))
    for in_memory, verify in ((True, True), (False, True), (False, False)):
        listed = FolderImages.from_paths(whole.paths, whole.labels, whole.class_names, 16, on_corrupt="fail",
                                         root=root, num_workers=workers, in_memory=in_memory, verify=verify)
        assert listed.in_memory == in_memory and listed.verified == verify and listed.paths == whole.paths
        assert torch.equal(listed.labels, whole.labels) and listed.report == whole.report
        assert listed.fingerprint() == whole.fingerprint()
        for (images, labels, indices), (want_images, want_labels, want_indices) in zip(listed.uint8_batches(order), reference):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
            assert torch.equal(indices, want_indices)
        if verify:
            assert listed.image_statistics() == whole.image_statistics()
    # An index subset, reordered: only the chosen files, in the given order.
    chosen = [17, 3, 25, 4]
    subset = FolderImages.from_paths([whole.paths[i] for i in chosen], whole.labels[chosen], whole.class_names, 16,
                                     num_workers=workers, in_memory=False)
    assert subset.root == str(root) and len(subset) == 4
    (images, labels, _), = list(subset.uint8_batches([[0, 1, 2, 3]]))
    (want_images, want_labels, _), = list(whole.uint8_batches([chosen]))
    assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_a_path_list_with_a_corrupt_file(sets):
    root = sets["train"]
    good = FolderImages(root, 16, in_memory=False)
    bad = root / "green" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    paths, labels = [*good.paths[:12], str(bad), *good.paths[12:]], [*good.labels[:12].tolist(), 1, *good.labels[12:].tolist()]
    for in_memory in (True, False):
        skipping = FolderImages.from_paths(paths, labels, good.class_names, 16, in_memory=in_memory)
        assert skipping.paths == good.paths and skipping.report.skipped_paths == [str(bad)]
        (images, _, _), = list(skipping.uint8_batches([list(range(len(skipping)))]))
        (want, _, _), = list(good.uint8_batches([list(range(len(good)))]))
        assert torch.equal(images, want)
        with pytest.raises(IGDSInputError, match="corrupt image .*broken.jpg") as info:
            FolderImages.from_paths(paths, labels, good.class_names, 16, on_corrupt="fail", in_memory=in_memory)
        assert "\n" not in str(info.value)
    # Unverified: construction decodes nothing; the batch that reaches the file fails, naming it.
    unverified = FolderImages.from_paths(paths, labels, good.class_names, 16, on_corrupt="fail", in_memory=False,
                                         verify=False)
    assert len(unverified) == len(paths)
    assert len(list(unverified.uint8_batches([[0, 1]]))) == 1
    with pytest.raises(IGDSInputError, match="unreadable image .*broken.jpg") as info:
        list(unverified.uint8_batches([[11, 12]]))
    assert "\n" not in str(info.value)
    with pytest.raises(IGDSInputError, match="verify=False"):
        unverified.image_statistics()
    with pytest.raises(IGDSInputError, match="'green'.*no readable images"):
        FolderImages.from_paths([str(bad), *good.paths[:1]], [1, 0], ["red", "green"], 16, in_memory=False)


def test_a_bad_path_list_is_one_line(sets):
    whole = FolderImages(sets["val"], 8, in_memory=False)
    paths, labels, names = whole.paths, whole.labels, whole.class_names
    cases = [
        ((paths, labels[:-1], names, 8), {}, "18 paths but 17 labels"),
        ((paths, labels.float(), names, 8), {}, "labels must be integers"),
        ((paths, [["a"]] * len(paths), names, 8), {}, "labels must be integers"),
        ((paths, labels + 1, names, 8), {}, r"labels must lie in \[0, 3\)"),
        ((paths, labels - 1, names, 8), {}, r"labels must lie in \[0, 3\)"),
        ((paths, labels, [*names, "grey"], 8), {"in_memory": False}, "'grey'.*no readable images"),
        ((paths, labels, ["red", "red", "blue"], 8), {}, "lists a class twice"),
        (([], [], names, 8), {}, "the path list is empty"),
        ((paths, labels, names, 0), {}, "image_size must be a positive integer"),
        ((paths, labels, names, 8), {"num_workers": -1}, "num_workers must be a non-negative integer"),
        ((paths, labels, names, 8), {"verify": False}, "verify=False needs on_corrupt='fail'"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(IGDSInputError, match=message) as info:
            FolderImages.from_paths(*args, **kwargs)
        assert "\n" not in str(info.value), message


# ---- train-ve -----------------------------------------------------------------------------------


def _small_config(**overrides):
    settings = dict(arch="resnet18", in_channels=3, resolution=16, epochs=2, batch_size=8, queue_size=16,
                    bn_splits=2, moco_momentum=0.9, optimizer="adam", lr=1e-3, classifier_epochs=10,
                    lambda_cmi=0.1, centroid_update="epoch", seed=3)
    settings.update(overrides)
    return VETrainConfig(**settings)


def _assert_same_bundle(first: VariationalEstimator, second: VariationalEstimator):
    a, b = first.bundle_tensors(), second.bundle_tensors()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_ve_cli_streamed_equals_in_memory(sets, tmp_path, monkeypatch):
    results = {}
    for streamed in (False, True):
        _streamed(monkeypatch, streamed)
        out = tmp_path / f"ve_{streamed}.safetensors"
        args = cli.parse([
            "train-ve", "--data", str(sets["train"]), "--val", str(sets["val"]), "--out", str(out),
            "--resolution", "16", "--image-size", "20", "--epochs", "1", "--batch-size", "8", "--queue-size", "16",
            "--lambda", "0.1", "--classifier-epochs", "10", "--quiet",
        ])
        assert args.handler(args) == 0
        report = json.loads((tmp_path / f"ve_{streamed}.safetensors.report.json").read_text())
        assert report["streamed"] is streamed
        for suffix in ("checkpoint", "checkpoint.features", "checkpoint.classifier"):  # removed once done
            assert not (tmp_path / f"ve_{streamed}.safetensors.{suffix}").exists()
        results[streamed] = (VariationalEstimator.load(out), report)
    _assert_same_bundle(results[False][0], results[True][0])
    for key in ("train", "val", "mean", "std", "label_entropy"):
        assert results[False][1][key] == results[True][1][key], key
    assert [r["loss"] for r in results[False][1]["history"]] == [r["loss"] for r in results[True][1]["history"]]


def test_train_ve_resumes_from_its_epoch_checkpoint(sets, tmp_path, monkeypatch, capsys):
    train = FolderImages(sets["train"], 16, in_memory=False)
    uninterrupted, report = train_ve_from_source(train, train.class_names, _small_config(), **QUIET)
    assert len(report["history"]) == 2

    checkpoint = tmp_path / "run.checkpoint"
    original_save = MoCoTrainer.save_checkpoint

    class Interrupted(Exception):
        pass

    def save_then_stop(self, path, key, epoch, step, history):
        original_save(self, path, key, epoch, step, history)
        raise Interrupted(f"killed after epoch {epoch}")

    monkeypatch.setattr(MoCoTrainer, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted, match="after epoch 1"):
        train_ve_from_source(train, train.class_names, _small_config(), checkpoint=checkpoint, **QUIET)
    monkeypatch.setattr(MoCoTrainer, "save_checkpoint", original_save)
    assert checkpoint.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    with pytest.raises(IGDSInputError, match="belongs to another run .*config") as info:
        train_ve_from_source(train, train.class_names, _small_config(lr=2e-3), checkpoint=checkpoint, **QUIET)
    assert "\n" not in str(info.value)

    messages = []
    capsys.readouterr()
    resumed, resumed_report = train_ve_from_source(train, train.class_names, _small_config(), checkpoint=checkpoint,
                                                   log=messages.append, progress=True)
    assert any("resumed" in m and "after epoch 1/2" in m for m in messages)
    err = capsys.readouterr().err  # per-epoch progress: only the epoch left to run
    assert "train-ve epoch 2/2 30/30 img" in err and "epoch 1/2" not in err
    assert [r["epoch"] for r in resumed_report["history"]] == [1, 2]
    assert [r["loss"] for r in resumed_report["history"]] == [r["loss"] for r in report["history"]]
    _assert_same_bundle(uninterrupted, resumed)


# ---- calibrate-beta and eval ----------------------------------------------------------------------


def test_calibrate_cli_streamed_equals_in_memory(sets, tmp_path, monkeypatch):
    train = FolderImages(sets["train"], 16)
    ve, _ = train_ve_from_source(train, train.class_names, _small_config(epochs=0, classifier_epochs=30), **QUIET)
    ve_path = tmp_path / "ve.safetensors"
    ve.save(ve_path)
    documents = {}
    for streamed in (False, True):
        _streamed(monkeypatch, streamed)
        out = tmp_path / f"beta_{streamed}.json"
        args = cli.parse([
            "calibrate-beta", "--data", str(sets["train"]), "--val", str(sets["val"]), "--ve", str(ve_path),
            "--ipc", "1,2", "--betas", "0,1", "--out", str(out), "--epochs", "2", "--width", "8", "--quiet",
        ])
        assert args.handler(args) == 0
        documents[streamed] = json.loads(out.read_text())
    assert documents[False]["beta_per_ipc"] == documents[True]["beta_per_ipc"]
    strip = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert strip(documents[False]["table"]) == strip(documents[True]["table"])
    assert documents[True]["settings"]["val_images"] == 18


def test_eval_cli_streamed_equals_in_memory_with_epoch_progress(sets, tmp_path, monkeypatch, capsys):
    results = {}
    for streamed in (False, True):
        _streamed(monkeypatch, streamed)
        out = tmp_path / f"results_{streamed}.json"
        code = main(["eval", "--train", str(sets["distilled"]), "--val", str(sets["val"]), "--network", "convnet3",
                     "--seeds", "2", "--epochs", "3", "--image-size", "16", "--width", "8", "--out", str(out),
                     "--device", "cpu"])
        assert code == 0
        results[streamed] = json.loads(out.read_text())
        err = capsys.readouterr().err
        # Per-epoch progress (a plain line at the start and the end of each seed off a terminal).
        assert "eval convnet3 seed 0 3/3 epoch" in err and "eval convnet3 seed 1 3/3 epoch" in err
    assert results[True]["val_streamed"] and not results[False]["val_streamed"]
    assert results[False]["accuracies"] == results[True]["accuracies"]
    assert results[True]["test_size"] == 18


def test_eval_streamed_corrupt_validation_files(sets, tmp_path, monkeypatch, capsys):
    _streamed(monkeypatch, True)
    bad = sets["val"] / "blue" / "zz.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "r.json"
    common = ["eval", "--train", str(sets["distilled"]), "--val", str(sets["val"]), "--network", "convnet3",
              "--seeds", "1", "--epochs", "1", "--image-size", "16", "--width", "8", "--quiet", "--device", "cpu"]
    assert main([*common, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["val_load"]["num_skipped_corrupt"] == 1 and results["test_size"] == 18
    assert "skipped 1 unreadable val image" in capsys.readouterr().err
    assert main([*common, "--on-corrupt", "fail"]) == 2
    err = capsys.readouterr().err
    assert "zz.jpg" in err and err.count("\n") == 1
