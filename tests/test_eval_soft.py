"""`igds-fast eval --protocol rded|sre2l`: the KD loss, the draws and their application, tiny runs of both
protocols (torchvision students and teachers, our own networks), the SRe2L relabel file (SIGKILL then rerun =
the uninterrupted bytes, the disk refusal, top-k), the class-order check, the baselines and every refusal.

The tiny runs use our own networks as students and teachers (convnet3: they run in CI, where torchvision cannot
be installed beside torch 2.13.0); the tests that build torchvision networks (a torchvision teacher,
--network torchvision:mobilenet_v2, the transforms against torchvision's) skip without the torchvision extra."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igds_fast.cli import main
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.kd_augment import crop_resize_flip, draw_epoch, shuffle_patches
from igds_fast.evaluate.kd_train import kd_loss_sum
from igds_fast.evaluate.relabel import keep_top_k_probabilities
from soft_data import permuted_teacher, random_teacher, torchvision_or_skip, trained_teacher, write_colour_folder

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
       "IGDS_DATA_WORKERS": "0"}


# ---- the loss and the draws (no torchvision) -----------------------------------------------------------------

def test_kd_loss_equals_the_closed_form(rng_seed):
    generator = torch.Generator().manual_seed(rng_seed)
    student = torch.randn(7, 11, generator=generator) * 3
    teacher = torch.randn(7, 11, generator=generator) * 3
    for temperature in (1.0, 4.0, 20.0):
        q = F.softmax(teacher / temperature, dim=1)
        ours = kd_loss_sum(student, q, temperature) / 7
        s64, t64 = student.double().numpy() / temperature, teacher.double().numpy() / temperature
        log_p = s64 - np.log(np.exp(s64 - s64.max(1, keepdims=True)).sum(1, keepdims=True)) - s64.max(1, keepdims=True)
        log_q = t64 - np.log(np.exp(t64 - t64.max(1, keepdims=True)).sum(1, keepdims=True)) - t64.max(1, keepdims=True)
        closed = float((np.exp(log_q) * (log_q - log_p)).sum() / 7)  # sum_i KL(q_i || p_i) / B, no T^2
        assert abs(float(ours) - closed) < 1e-5 * max(1.0, abs(closed))
        peers = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / temperature, dim=1), q)
        assert torch.allclose(ours, peers, rtol=1e-6, atol=1e-7)  # what RDED main.py:202-226 / SRe2L call


def test_epoch_draws_are_keyed_by_seed_and_epoch_and_inside_the_image():
    kwargs = dict(count=37, batch_size=8, source_side=40, output_side=32, crop_scale=(0.08, 1.0), patch_factor=2)
    first, again, other = draw_epoch(3, 5, **kwargs), draw_epoch(3, 5, **kwargs), draw_epoch(3, 6, **kwargs)
    assert torch.equal(first.order, again.order) and torch.equal(first.crops, again.crops)
    assert torch.equal(first.mix_boxes, again.mix_boxes) and not torch.equal(first.order, other.order)
    assert sorted(first.order.tolist()) == list(range(37))
    top, left, height, width = first.crops.T
    assert bool((top >= 0).all() and (left >= 0).all() and (top + height <= 40).all() and (left + width <= 40).all())
    area = (height * width).double() / 1600
    assert bool((area > 0.05).all()) and float(area.max()) <= 1.0
    for batch in range(first.num_batches):
        positions = list(first.batch_positions(batch))
        assert sorted(first.mix_partner[positions].tolist()) == list(range(len(positions)))  # a permutation
        r0, r1, c0, c1 = first.mix_boxes[batch].tolist()
        assert 0 <= r0 <= r1 <= 32 and 0 <= c0 <= c1 <= 32


def test_shuffle_patches_moves_whole_strips(rng_seed):
    images = torch.rand(3, 3, 9, 8, generator=torch.Generator().manual_seed(rng_seed))
    perms = torch.tensor([[[1, 0], [0, 1]], [[0, 1], [1, 0]], [[1, 0], [1, 0]]])
    out = shuffle_patches(images, perms)
    assert out.shape == (3, 3, 8, 8)  # 9 rows -> 2 strips of 4 (the remainder dropped, as RDED's)
    assert torch.equal(out[0], torch.cat([images[0, :, :8, 4:8], images[0, :, :8, 0:4]], dim=2))
    assert torch.equal(out[1], torch.cat([images[1, :, 4:8, :], images[1, :, 0:4, :]], dim=1))
    swapped = torch.cat([images[2, :, :, 4:8], images[2, :, :, 0:4]], dim=2)
    assert torch.equal(out[2], torch.cat([swapped[:, 4:8], swapped[:, 0:4]], dim=1))


def test_top_k_soft_labels_are_keep_top_k_of_the_softmax(rng_seed):
    logits = torch.randn(5, 20, generator=torch.Generator().manual_seed(rng_seed)) * 4
    temperature, k = 3.0, 4
    values, index = logits.topk(k, dim=1)
    ours = keep_top_k_probabilities(values, index, torch.logsumexp(logits / temperature, dim=1), temperature, 20)
    p = F.softmax(logits / temperature, dim=1)  # SRe2L validate/utils.py:5-24, written out
    top, where = p.topk(k, dim=1)
    expected = ((1 - top.sum(1, keepdim=True)) / (20 - k)).expand(5, 20).clone().scatter_(1, where, top)
    assert torch.allclose(ours, expected, atol=1e-6) and torch.allclose(ours.sum(1), torch.ones(5), atol=1e-6)


def test_every_relabel_epoch_file_has_the_size_epoch_bytes_says():
    from igds_fast.evaluate.relabel import RelabelSpec, _header, epoch_bytes

    spec = RelabelSpec(teacher={"arch": "convnet3", "file": "x"}, images="y", count=100, num_classes=10, class_map=None,
                       epochs=300, batch_size=20, seed=42, source_side=32, output_side=32, crop_scale=[0.08, 1.0],
                       crop_ratio=[0.75, 4 / 3], patch_factor=1, flip=True, cutmix_beta=1.0, topk=0, temperature=None)
    for count in range(100, 108):  # the header's unpadded length at every remainder mod 8
        other = dataclasses.replace(spec, count=count, images="y" * count)
        sizes = {len(_header(other, epoch)) for epoch in (0, 9, 10, 99, 100, 299)}  # one, two and three digits
        assert len(sizes) == 1, count
    sizes = {len(_header(spec, epoch)) for epoch in (0, 299)}
    assert epoch_bytes(spec) == sizes.pop() + 100 * 4 * 4 + 100 + 5 * 4 * 4 + 5 * 4 + 100 * 8 * 2 + 100 * 10 * 2


# ---- against torchvision ------------------------------------------------------------------------------------

@pytest.mark.torchvision
def test_crop_and_resize_is_torchvision_resized_crop(rng_seed):
    torchvision_or_skip()
    from torchvision.transforms import functional as TF

    images = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(rng_seed))
    crops = torch.tensor([[0, 0, 40, 40], [3, 5, 20, 31], [10, 2, 30, 12], [1, 1, 37, 38]], dtype=torch.int32)
    flips = torch.tensor([False, True, False, True])
    ours = crop_resize_flip(images, crops, flips, 32)
    for k, (top, left, height, width) in enumerate(crops.tolist()):
        theirs = TF.resized_crop(images[k], top, left, height, width, [32, 32], antialias=True)
        if flips[k]:
            theirs = TF.hflip(theirs)
        assert torch.equal(ours[k], theirs), k


@pytest.mark.torchvision
def test_test_images_are_resize_then_centre_crop_as_torchvision(tmp_path):
    torchvision_or_skip()
    from PIL import Image
    from torchvision import transforms

    from igds_fast.data.folders import load_image

    rng = np.random.default_rng(1)
    for size in ((300, 200), (173, 260), (256, 256)):
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        ours = load_image(str(path), 224, 3, resize=256)
        with Image.open(path) as image:
            theirs = np.asarray(transforms.CenterCrop(224)(transforms.Resize(256)(image.convert("RGB"))))
        assert np.array_equal(ours, theirs.transpose(2, 0, 1)), size


# ---- tiny runs ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("soft")
    write_colour_folder(root / "distilled", 4, 40, seed=1)
    write_colour_folder(root / "val", 10, 36, seed=2)
    write_colour_folder(root / "real", 8, 40, seed=3)
    return {"root": root, "distilled": str(root / "distilled"), "val": str(root / "val"), "real": str(root / "real"),
            "random_teacher": random_teacher(root / "random_teacher.pt"),
            "good_teacher": trained_teacher(root / "good_teacher.pt", str(root / "val"))}


def _eval(folders, tmp_path, *extra, protocol="rded", teacher="random_teacher", student="convnet3",
          teacher_arch="convnet3"):
    out = tmp_path / f"{protocol}.json"
    argv = ["eval", "--train", folders["distilled"], "--val", folders["val"], "--protocol", protocol,
            "--teacher", folders[teacher], "--teacher-arch", teacher_arch, "--network", student,
            "--image-size", "32", "--epochs", "2", "--seeds", "1", "--batch-size", "6", "--device", "cpu", "--quiet",
            "--out", str(out), *extra]
    if teacher == "random_teacher" and "--ignore-class-check" not in extra:
        argv.append("--ignore-class-check")
    if protocol == "sre2l" and "--relabel-dir" not in extra:
        argv += ["--relabel-dir", str(tmp_path / "relabel")]
    return main(argv), out


def test_tiny_rded_run_with_baseline_and_hard_labels(folders, tmp_path, capsys):
    code, out = _eval(folders, tmp_path, "--baseline", "random-real", "--real", folders["real"], "--also-hard-labels")
    printed = capsys.readouterr()
    assert code == 0, printed.err
    result = json.loads(out.read_text())
    assert result["set"] == "distilled" and result["labels"] == "soft" and result["network"] == "convnet3"
    assert result["protocol"]["name"] == "rded" and result["protocol"]["temperature"] == 20.0
    assert result["protocol"]["lr"] == 0.001 and "argument.py" in result["protocol"]["lr_source"]  # RDED's conv3
    assert result["teacher"]["arch"] == "convnet3" and result["teacher"]["class_map"] is None
    assert result["teacher"]["class_check"]["overridden"] and not result["teacher"]["class_check"]["passed"]
    assert "best_accuracies" not in result  # RDED never tests a 2-epoch run (only past 80% of training, main.py:180)
    kinds = [(r["set"], r["labels"]) for r in result["runs"]]
    assert kinds == [("distilled", "hard"), ("random-real", "soft"), ("random-real", "hard")]
    assert math.isclose(result["gain_over_random_real"], result["mean"] - result["runs"][1]["mean"])
    assert math.isclose(result["teacher_share"], result["mean"] - result["runs"][0]["mean"])
    assert len(result["baseline"]["files"]) == 12 and result["train_size"] == 12
    assert "distilled - random real" in printed.out and "soft - hard labels" in printed.out
    assert "protocol: rded (AdamW lr 0.001" in printed.out
    # The volume before the training (issue 28): 2 sets x 2 label modes x 1 seed x 2 epochs x 12 images; the
    # teacher labels every image-pass of the two soft runs and the check's validation images.
    assert "eval: plan: 4 network(s): 1 x 2 epochs x 12 images + 1 x 2 epochs x 12 images + 1 x 2 epochs x 12 " \
           "images + 1 x 2 epochs x 12 images = 96 image-passes of training" in printed.err
    assert f"teacher convnet3: 48 online labellings + {result['teacher']['class_check']['images']} check forwards" \
        in printed.err
    for run in [result, *result["runs"]]:
        assert all(0.0 <= a <= 100.0 for a in run["accuracies"]) and run["epochs"] == 2


def test_the_student_is_built_at_the_given_width(folders, tmp_path, monkeypatch):
    """--width (a ConvNet's channels) reaches the soft protocols' student; it was accepted and ignored."""
    import igds_fast.evaluate.kd_run as kd_run

    widths = []
    original = kd_run.build_eval_network
    monkeypatch.setattr(kd_run, "build_eval_network",
                        lambda name, channels, classes, size, width=128: widths.append(width) or original(
                            name, channels, classes, size, width))
    code, _ = _eval(folders, tmp_path, "--width", "16")
    assert code == 0 and widths and set(widths) == {16}


def test_tiny_sre2l_run_records_relabels_and_replays_them(folders, tmp_path):
    code, out = _eval(folders, tmp_path, protocol="sre2l")
    assert code == 0
    result = json.loads(out.read_text())
    relabel = result["relabel"]
    assert relabel["made_epochs"] == 2 and relabel["spec"]["batch_size"] == 6 and relabel["spec"]["seed"] == 42
    files = sorted(os.listdir(tmp_path / "relabel"))
    assert files == ["epoch_00000.safetensors", "epoch_00001.safetensors", "relabel.json"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "relabel" / "epoch_00001.safetensors"), "pt") as handle:
        assert handle.get_tensor("logits").dtype == torch.float16 and handle.get_tensor("logits").shape == (12, 3)
        assert sorted(handle.get_tensor("order").tolist()) == list(range(12))
    # SRe2L tests after epoch 0 and the last (train_FKD.py:183): its figure is the better of the two.
    assert len(result["best_accuracies"]) == 1 and result["best_accuracies"][0] >= result["accuracies"][0]
    code, again = _eval(folders, tmp_path, protocol="sre2l")  # a rerun replays the same files
    assert code == 0 and json.loads(again.read_text())["relabel"]["made_epochs"] == 0


def test_a_streamed_distilled_set_gives_the_in_memory_accuracies(folders, tmp_path, monkeypatch):
    (tmp_path / "held").mkdir()
    (tmp_path / "streamed").mkdir()
    code, held = _eval(folders, tmp_path / "held", "--seeds", "2")
    assert code == 0
    monkeypatch.setenv("IGDS_IN_MEMORY_MB", "0")  # every set decoded batch by batch by the loader
    code, streamed = _eval(folders, tmp_path / "streamed", "--seeds", "2")
    assert code == 0
    held, streamed = json.loads(held.read_text()), json.loads(streamed.read_text())
    assert streamed["streamed"] and not held["streamed"]
    assert streamed["accuracies"] == held["accuracies"]


def test_random_real_baseline_under_a_hard_label_protocol(folders, tmp_path, capsys):
    out = tmp_path / "igds.json"
    code = main(["eval", "--train", folders["distilled"], "--val", folders["val"], "--network", "convnet3",
                 "--image-size", "16", "--epochs", "2", "--seeds", "1", "--device", "cpu", "--quiet", "--baseline",
                 "random-real", "--real", folders["real"], "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    baseline = result["baseline"]
    assert baseline["set"] == "random-real" and len(baseline["files"]) == 12 and baseline["train_size"] == 12
    assert sorted(baseline["files"]) != sorted(os.listdir(folders["distilled"]))
    assert math.isclose(result["gain_over_random_real"], result["mean"] - baseline["mean"])
    assert "distilled - random real" in printed and "random-real" in printed
    # the same seed draws the same files
    assert main(["eval", "--train", folders["distilled"], "--val", folders["val"], "--network", "convnet3",
                 "--image-size", "16", "--epochs", "1", "--seeds", "1", "--device", "cpu", "--quiet", "--baseline",
                 "random-real", "--real", folders["real"], "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["baseline"]["files"] == baseline["files"]


@pytest.mark.parametrize("network", ["convnet3", "resnet_ap10", "resnet18_in"])
def test_our_networks_train_under_both_soft_protocols(folders, tmp_path, network):
    for protocol in ("rded", "sre2l"):
        code, out = _eval(folders, tmp_path, "--epochs", "1", protocol=protocol, student=network)
        assert code == 0, (network, protocol)
        result = json.loads(out.read_text())
        assert result["network"] == network and result["image_size"] == 32


def test_class_order_check_stops_a_permuted_teacher_in_one_line(folders, tmp_path, capsys):
    permuted = permuted_teacher(folders["good_teacher"], tmp_path / "permuted.pt")
    code, out = _eval({**folders, "permuted": permuted}, tmp_path, teacher="permuted")
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and "class order most likely does not match" in err and "0.0%" in err
    assert "--ignore-class-check" in err
    code, out = _eval(folders, tmp_path, "--epochs", "1", teacher="good_teacher")
    assert code == 0
    check = json.loads(out.read_text())["teacher"]["class_check"]
    assert check["passed"] and check["accuracy_percent"] == 100.0 and check["images"] == 30


def test_a_1000_class_teacher_maps_wnid_folders(tmp_path):
    from igds_fast.classes import imagenet_wnids
    from igds_fast.evaluate.class_check import teacher_class_map

    wnids = imagenet_wnids()
    chosen = [wnids[7], wnids[100], wnids[999]]
    assert teacher_class_map(chosen, 1000)[0] == [7, 100, 999]
    assert teacher_class_map(["x", "y"], 2)[0] is None
    with pytest.raises(IGDSInputError, match="not ImageNet wnids"):
        teacher_class_map(["x", "y"], 1000)
    with pytest.raises(IGDSInputError, match="the teacher has 5 classes; the data has 3"):
        teacher_class_map(["a", "b", "c"], 5)


def test_a_1000_class_teacher_on_wnid_folders_end_to_end(tmp_path):
    from igds_fast.classes import imagenet_wnids

    wnids = [imagenet_wnids()[i] for i in (3, 500, 998)]
    write_colour_folder(tmp_path / "distilled", 2, 40, seed=5, names=wnids)
    write_colour_folder(tmp_path / "val", 3, 36, seed=6, names=wnids)
    teacher = random_teacher(tmp_path / "in1k.pt", num_classes=1000)
    folders = {"distilled": str(tmp_path / "distilled"), "val": str(tmp_path / "val"), "random_teacher": teacher}
    code, out = _eval(folders, tmp_path, "--epochs", "1", "--batch-size", "3")
    assert code == 0
    recorded = json.loads(out.read_text())["teacher"]
    assert recorded["outputs"] == 1000 and recorded["class_map"] == [3, 500, 998] and "by wnid" in recorded["mapping"]
    assert recorded["class_check"]["images"] == 9 and not recorded["class_check"]["passed"]


# ---- refusals -------------------------------------------------------------------------------------------------

def test_bad_inputs_stop_in_one_line_before_training(folders, tmp_path, capsys):
    other_arch = random_teacher(tmp_path / "resnet.pt", arch="resnet_ap10")
    five = random_teacher(tmp_path / "five.pt", num_classes=5)
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state_dict)
    cases = [
        ({"random_teacher": str(tmp_path / "missing.pt")}, (), "does not exist"),
        ({"random_teacher": other_arch}, (), "does not fit convnet3 at 32 px"),
        ({"random_teacher": five}, (), "the teacher has 5 classes; the data has 3"),
        ({"random_teacher": str(not_a_state_dict)}, (), "is not a state dict"),
        ({}, ("--schedule", "step"), "--schedule applies to --protocol igds or minimax only"),
        ({}, ("--rded-factor", "2", "--protocol", "sre2l"), "--rded-factor applies to --protocol rded only"),
        ({}, ("--soft-label-topk", "3"), "--soft-label-topk applies to --protocol sre2l only"),
        ({}, ("--relabel-dir", str(tmp_path / "r")), "--relabel-dir applies to --protocol sre2l only"),
        ({}, ("--baseline", "random-real"), "--baseline random-real needs --real"),
        ({}, ("--ipc", "9"), "--ipc 9: class 'a' of --train has 4 image(s)"),
        ({}, ("--teacher-arch", "resnet18"), "--teacher-arch must be torchvision:NAME (e.g. torchvision:resnet18) or"),
        ({}, ("--network", "convnet9"), "ConvNet depth must be 3..6, got 'convnet9'"),
    ]
    for changes, extra, expected in cases:
        started = time.perf_counter()
        code, _ = _eval({**folders, **changes}, tmp_path, *extra)
        err = capsys.readouterr().err.strip()
        assert code == 2 and expected in err and len(err.splitlines()) == 1, (expected, err)
        assert "epoch" not in err and time.perf_counter() - started < 30
    for argv, expected in (
        (["--protocol", "igds", "--teacher", folders["random_teacher"]], "--teacher applies to --protocol rded or sre2l only"),
        (["--protocol", "rded"], "--protocol rded needs --teacher CKPT"),
        (["--protocol", "sre2l", "--teacher", folders["random_teacher"]], "--protocol sre2l needs --relabel-dir"),
    ):
        code = main(["eval", "--train", folders["distilled"], "--val", folders["val"], *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and expected in err and len(err.splitlines()) == 1, err


def test_torchvision_names_without_torchvision_say_how_to_install(monkeypatch):
    from igds_fast.evaluate.networks import build_eval_network

    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(IGDSInputError, match=r"install it: pip install \"igds_fast\[torchvision\]\""):
        build_eval_network("torchvision:resnet18", 3, 10, 32)


def test_relabel_refuses_a_disk_that_cannot_hold_it(folders, tmp_path, capsys, monkeypatch):
    import igds_fast.evaluate.relabel as relabel

    real = relabel.shutil.disk_usage
    monkeypatch.setattr(relabel.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    code, _ = _eval(folders, tmp_path, protocol="sre2l")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2, err  # the storage it needs, printed before it starts; the refusal
    assert err[0].startswith("SRe2L relabel: 12 images x 2 epochs x 3 classes x 2 bytes (fp16 logits)")
    assert err[1].startswith("igds-fast: error: --relabel-dir") and "1000 bytes free" in err[1]
    assert not (tmp_path / "relabel").exists()


def test_relabel_folder_of_other_settings_is_refused(folders, tmp_path, capsys):
    code, _ = _eval(folders, tmp_path, "--epochs", "1", protocol="sre2l")
    assert code == 0
    code, _ = _eval(folders, tmp_path, "--epochs", "1", "--temperature", "4", "--soft-label-topk", "2", protocol="sre2l")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds soft labels made with other settings" in err and "topk" in err


# ---- SIGKILL during the relabel stage ---------------------------------------------------------------------------

WRAPPER = """
import sys, time
import igds_fast.evaluate.kd_train as kd_train
rows = kd_train.soft_label_rows
def slow_rows(logits, spec):
    time.sleep(0.15)
    return rows(logits, spec)
kd_train.soft_label_rows = slow_rows
from igds_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_relabel_sigkilled_mid_write_then_rerun_gives_the_uninterrupted_bytes(folders, tmp_path):
    def argv(relabel):
        return ["eval", "--train", folders["distilled"], "--val", folders["val"], "--protocol", "sre2l", "--teacher",
                folders["random_teacher"], "--teacher-arch", "convnet3", "--network", "convnet3", "--image-size", "32", "--epochs", "4", "--seeds", "1",
                "--batch-size", "4", "--device", "cpu", "--quiet", "--ignore-class-check", "--relabel-dir", str(relabel)]

    reference = tmp_path / "reference"
    assert main(argv(reference)) == 0
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(wrapper), *argv(killed)], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240

    def state():
        names = os.listdir(killed) if killed.is_dir() else []
        return sum(n.startswith("epoch_") for n in names), [n for n in names if n.endswith(".tmp")]

    while time.monotonic() < deadline and process.poll() is None:
        done, temporaries = state()
        if done >= 1 and temporaries and os.path.getsize(killed / temporaries[0]) > 0:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    done, temporaries = state()
    assert 1 <= done < 4 and temporaries, "the kill did not land inside an epoch file's write"
    assert main(argv(killed)) == 0
    names = sorted(os.listdir(reference))
    assert sorted(os.listdir(killed)) == names and len(names) == 5
    for name in names:
        assert (killed / name).read_bytes() == (reference / name).read_bytes(), name


# ---- torchvision students and teachers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tv_folders(folders, tmp_path_factory):
    torchvision_or_skip()
    root = tmp_path_factory.mktemp("soft_tv")
    return {**folders, "tv_teacher": trained_teacher(root / "tv_teacher.pt", folders["val"],
                                                     arch="torchvision:shufflenet_v2_x0_5", steps=60)}


@pytest.mark.torchvision
def test_torchvision_mobilenet_v2_student_and_torchvision_teacher_under_rded(tv_folders, tmp_path, capsys):
    code, out = _eval(tv_folders, tmp_path, teacher="tv_teacher", teacher_arch="torchvision:shufflenet_v2_x0_5",
                      student="torchvision:mobilenet_v2")
    printed = capsys.readouterr()
    assert code == 0, printed.err
    result = json.loads(out.read_text())
    assert result["network"] == "torchvision:mobilenet_v2" and result["teacher"]["arch"] == "torchvision:shufflenet_v2_x0_5"
    assert result["protocol"]["lr"] == 0.0025 and "argument.py" in result["protocol"]["lr_source"]  # RDED's mobilenet_v2
    assert result["teacher"]["class_check"]["passed"] and result["teacher"]["class_check"]["accuracy_percent"] == 100.0
    assert "protocol: rded (AdamW lr 0.0025" in printed.out


@pytest.mark.torchvision
def test_torchvision_student_under_sre2l(tv_folders, tmp_path):
    code, out = _eval(tv_folders, tmp_path, "--epochs", "1", protocol="sre2l", teacher="tv_teacher",
                      teacher_arch="torchvision:shufflenet_v2_x0_5", student="torchvision:shufflenet_v2_x0_5")
    assert code == 0
    assert json.loads(out.read_text())["relabel"]["spec"]["teacher"]["arch"] == "torchvision:shufflenet_v2_x0_5"


@pytest.mark.torchvision
def test_torchvision_bad_inputs_stop_in_one_line(tv_folders, tmp_path, capsys):
    resnet = random_teacher(tmp_path / "resnet.pt", arch="torchvision:resnet18")
    for changes, arch, extra, expected in (
        ({"random_teacher": resnet}, "torchvision:shufflenet_v2_x0_5", (), "does not fit torchvision:shufflenet_v2_x0_5"),
        ({"random_teacher": tv_folders["tv_teacher"]}, "convnet3", (), "does not fit convnet3"),
        ({}, "convnet3", ("--network", "torchvision:not_a_net"), "is not a torchvision classification model"),
    ):
        code, _ = _eval({**tv_folders, **changes}, tmp_path, *extra, teacher_arch=arch)
        err = capsys.readouterr().err.strip()
        assert code == 2 and expected in err and len(err.splitlines()) == 1, (expected, err)
