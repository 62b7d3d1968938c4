"""`igds-fast eval --protocol minimax` beside MinimaxDiffusion's own train.py (969fc6f), both run for two epochs
(and, without the peer, its 224-px default and --ipc cut seen from the network's stem).

The peer is driven as its README drives it (`python train.py -d imagenet --imagenet_dir DISTILLED REAL -n
resnet_ap --nclass 10 --norm_type instance --ipc N --slct_type random --spec woof`, here with --batch_size 8),
instrumented only where it cannot run on a CPU or would train thousands of epochs: its CUDA tensors and
`.cuda()` calls stay on the CPU, `args.epochs` is set to 2 (its `ipc_epoch` table is checked in
tests/test_eval_protocol.py) and its test frequency `epochs // 100` (0 at two epochs) to 1, matplotlib and
efficientnet_pytorch (not used by a ResNetAP run) are stubbed. Both runs record, through the same hooks
(a forward pre-hook on every 3-channel Conv2d -- the stem -- and a wrapper of torch.optim.SGD.step):
which files each class trains on, the optimizer's settings at every step, the input size in training
and in test, the test passes, and the test images as the network sees them. The distilled folder holds
3 images of 256 px per class and is evaluated at IPC 2 (the first 2 files, as its `_subset`); the real
validation images are 300 x 260 (Resize(224) + CenterCrop(224) as its `--size 224`).
"""
from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from igds_fast.cli import main
from peers import load_peer, peer_root

pytestmark = pytest.mark.usefixtures("one_thread")
IPC, STORED, BATCH = 2, 256, 8


class Recorder:
    """What a training run does, seen from outside: optimizer steps, stem inputs in train and test mode."""

    def __init__(self):
        self.steps, self.train_shapes, self.tests = [], [], []
        self._test: list | None = None

    def on_forward(self, module, inputs):
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            x = inputs[0]
            if module.training:
                self._test = None
                self.train_shapes.append(tuple(x.shape))
            else:
                if self._test is None:
                    self._test = []
                    self.tests.append(self._test)
                self._test.append(x.detach().float().clone())

    def on_step(self, optimizer):
        group = optimizer.param_groups[0]
        self.steps.append({key: group[key] for key in ("lr", "momentum", "weight_decay", "dampening", "nesterov")})
        self._test = None


@pytest.fixture
def recorder(monkeypatch):
    record = Recorder()
    handle = nn.modules.module.register_module_forward_pre_hook(record.on_forward)
    original_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        record.on_step(self)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    yield record
    handle.remove()


def _write(folder, classes, per_class, size, seed):
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        os.makedirs(folder / name, exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 256, 3)[None, None, :]
            pixels = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}_{index}.png")


@pytest.fixture(scope="module")
def woof(tmp_path_factory):
    root = peer_root("minimax")
    classes = open(os.path.join(root, "misc", "class_woof.txt")).read().split()
    base = tmp_path_factory.mktemp("minimax_side_by_side")
    _write(base / "distilled", classes, IPC + 1, (STORED, STORED), seed=1)
    _write(base / "real" / "val", classes, 2, (300, 260), seed=2)
    return {"root": root, "classes": classes, "distilled": base / "distilled", "real": base / "real"}


def _peer_run(woof, monkeypatch, record):
    """MinimaxDiffusion's train.py main() for two epochs on the CPU (see the module docstring)."""
    original_tensor = torch.tensor

    def tensor_on_cpu(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return original_tensor(*args, **kwargs)

    matplotlib = types.ModuleType("matplotlib")
    matplotlib.use = lambda *a, **k: None
    pyplot = types.ModuleType("matplotlib.pyplot")
    matplotlib.pyplot = pyplot
    efficientnet = types.ModuleType("efficientnet_pytorch")
    efficientnet.EfficientNet = None
    monkeypatch.setattr(torch, "tensor", tensor_on_cpu)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **k: self)
    argv = ["train.py", "-d", "imagenet", "--imagenet_dir", str(woof["distilled"]), str(woof["real"]), "-n", "resnet_ap",
            "--nclass", "10", "--norm_type", "instance", "--ipc", str(IPC), "--tag", "test", "--slct_type", "random",
            "--spec", "woof", "--batch_size", str(BATCH), "-j", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    stubs = {"matplotlib": matplotlib, "matplotlib.pyplot": pyplot, "efficientnet_pytorch": efficientnet}
    modules = load_peer("minimax", "argument", "train", stubs=stubs)
    monkeypatch.setattr(torch, "tensor", original_tensor)
    args, train = modules["argument"].args, modules["train"]
    assert args.epochs == 2000 and args.epoch_print_freq == 20 and args.size == 224  # its settings at IPC 2, 10 classes
    args.epochs, args.epoch_print_freq = 2, 1  # instrumented: two epochs, a test after each
    original_indices = train.random_indices
    monkeypatch.setattr(train, "random_indices", lambda y, nclass=10: original_indices(y, nclass=nclass, device="cpu"))
    monkeypatch.setattr(train, "Plotter", lambda *a, **k: None)
    monkeypatch.chdir(woof["root"])  # its class lists are read from ./misc/
    train.main(args, lambda *a, **k: None)
    _, train_loader, val_loader, _ = train.load_data(args)
    files = {os.path.basename(os.path.dirname(p)): sorted(os.path.basename(q) for q, _ in train_loader.dataset.samples
                                                          if os.path.dirname(q) == os.path.dirname(p))
             for p, _ in train_loader.dataset.samples}
    val_paths = [p for p, _ in val_loader.dataset.samples]
    return args, files, val_paths


def test_minimax_protocol_runs_as_minimax_train_py(woof, recorder, tmp_path, monkeypatch):
    pytest.importorskip("torchvision", reason="MinimaxDiffusion's train.py needs torchvision", exc_type=ImportError)
    args, peer_files, peer_val_paths = _peer_run(woof, monkeypatch, recorder)
    peer = recorder.__dict__.copy()
    recorder.__init__()
    monkeypatch.chdir(tmp_path)

    seen = {}
    import igds_fast.cli.eval as eval_cli

    original_flatten = eval_cli.flatten

    def flatten(paths_per_class):
        paths, labels = original_flatten(paths_per_class)
        seen.setdefault("train", paths)
        return paths, labels

    monkeypatch.setattr(eval_cli, "flatten", flatten)
    out = tmp_path / "ours.json"
    code = main(["eval", "--train", str(woof["distilled"]), "--val", str(woof["real"] / "val"), "--protocol", "minimax",
                 "--network", "resnet_ap10", "--ipc", str(IPC), "--epochs", "2", "--batch-size", str(BATCH),
                 "--seeds", "1", "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0
    ours = recorder.__dict__
    result = json.loads(out.read_text())

    # The files: the first IPC of each class by name, as its _subset.
    our_files = {}
    for path in seen["train"]:
        our_files.setdefault(os.path.basename(os.path.dirname(path)), []).append(os.path.basename(path))
    assert our_files == peer_files and all(len(v) == IPC for v in our_files.values())
    assert result["train_size"] == 10 * IPC and result["train_subset"]["cut_classes"] == 10

    # The optimizer at every step: SGD, its lr per epoch (MultiStepLR at 2E/3, 5E/6), momentum, weight decay.
    assert len(ours["steps"]) == len(peer["steps"]) == 2 * -(-10 * IPC // BATCH)
    assert ours["steps"] == peer["steps"]
    # At E = 2 both milestones (2E // 3, 5E // 6) are epoch 1: MultiStepLR applies gamma 0.2 twice there.
    assert [s["lr"] for s in peer["steps"]] == pytest.approx([args.lr] * 3 + [args.lr * 0.04] * 3, rel=1e-12)

    # Train and test at 224 px (its --size) though the set is stored at 256.
    assert sorted(ours["train_shapes"]) == sorted(peer["train_shapes"])
    assert {s[1:] for s in ours["train_shapes"]} == {(3, 224, 224)}

    # A test after each of the two epochs, on the same images as the network sees them.
    assert len(ours["tests"]) == len(peer["tests"]) == 2
    peer_test = torch.cat(peer["tests"][-1])
    our_test = torch.cat(ours["tests"][-1])
    assert peer_test.shape == our_test.shape == (20, 3, 224, 224)
    order = sorted(range(len(peer_val_paths)), key=lambda i: (os.path.basename(os.path.dirname(peer_val_paths[i])),
                                                             os.path.basename(peer_val_paths[i])))
    difference = (our_test - peer_test[order]).abs().max().item()
    assert difference <= 1e-5, difference  # ToTensor + Normalize vs our uint8 -> [-1, 1] -> ImageNet normalisation


def test_minimax_protocol_trains_a_256_px_set_at_224_and_cuts_to_the_first_ipc_files(tmp_path, recorder):
    """Without the peer (CI): the protocol's resolution and its subset rule, seen from the network's stem."""
    classes = ("n01", "n02")
    _write(tmp_path / "distilled", classes, 3, (STORED, STORED), seed=3)
    _write(tmp_path / "val", classes, 1, (300, 260), seed=4)
    out = tmp_path / "minimax.json"
    assert main(["eval", "--train", str(tmp_path / "distilled"), "--val", str(tmp_path / "val"), "--protocol", "minimax",
                 "--network", "convnet3", "--ipc", "2", "--epochs", "1", "--seeds", "1", "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["image_size"] == 224 and result["train_size"] == 4
    assert result["train_subset"] == {"ipc": 2, "rule": result["train_subset"]["rule"], "cut_classes": 2}
    assert {shape[1:] for shape in recorder.train_shapes} == {(3, 224, 224)}
    assert sum(shape[0] for shape in recorder.train_shapes) == 4 and recorder.tests[-1][0].shape[-2:] == (224, 224)
