"""`distill --select s3`: the selection against a direct S³ search, the manifest, SIGKILL at every stage then
rerun, 1 vs 2 torchrun ranks, the checkpoint encoder, refusals."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import test_distill
from test_distill import _parse, file_states, listing
from test_distill_torchrun import ENV, torchrun_command
from igds_fast.cli.distill import run as run_distill
from igds_fast.data import load_image, scan_image_folder, uint8_to_unit_range
from igds_fast.distill import CONFIG_NAME, distill, distill_config, distill_with_selection
from igds_fast.distill import select_stage
from igds_fast.errors import IGDSInputError
from igds_fast.imageio import save_png_atomic
from igds_fast.models.resnet import build_resnet
from igds_fast.preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess
from igds_fast.select import class_centroids, s3_search, select_real_indices

pytestmark = pytest.mark.usefixtures("one_thread")
models = test_distill.models  # the module-scoped fixture: a random-weight prior and VE on disk
CLASSES = ["cat", "dog", "owl", "emu"]  # the VE's list (test_distill.models)
GROUPS, IPC, STEPS = 3, 2, 4
REAL_PER_CLASS = 5


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    """An ImageFolder of 'real' images: 5 random 20x24 RGB PNGs per VE class, plus a class no run uses."""
    root = tmp_path_factory.mktemp("real")
    generator = torch.Generator().manual_seed(7)
    for name in CLASSES + ["yak"]:
        os.makedirs(root / name)
        for index in range(REAL_PER_CLASS):
            save_png_atomic(root / name / f"{index}.png", torch.rand(3, 20, 24, generator=generator) * 2 - 1)
    return str(root)


def s3_args(models, real, out, *extra):
    return ["--prior", models["prior"], "--ve", models["ve"], "--ipc", str(IPC), "--composite", "1", "--batch-size", "4",
            "--steps", str(STEPS), "--seed", "5", "--scale", "2", "--beta", "0.3", "--out", str(out), "--device", "cpu",
            "--quiet", "--select", "s3", "--groups", str(GROUPS), "--real", str(real), *extra]


def candidates_of(out):
    return f"{out}.s3-candidates"


def reference_features(paths, size, channels, encode):
    """L2-normalised features of image files, all at once (no batches, no stage files)."""
    images = torch.stack([torch.from_numpy(load_image(path, size, channels)) for path in paths])
    with torch.no_grad():
        return F.normalize(encode(uint8_to_unit_range(images)), dim=1)


def check_against_direct_search(out, real, encode, real_per_class, alpha=0.4, beta=0.9):
    """The chosen subgroups are s3_search's on features computed here in one go, and OUT holds their bytes."""
    candidates = candidates_of(out)
    names = [f"{k:05d}.png" for k in range(GROUPS * IPC)]
    candidate_paths = [os.path.join(candidates, c, n) for c in CLASSES for n in names]
    features = reference_features(candidate_paths, 16, 3, encode).reshape(len(CLASSES), GROUPS, IPC, -1)
    _, per_class = scan_image_folder(real, CLASSES, ignore_unlisted=True)
    paths = [p for ps in per_class for p in ps]
    labels = torch.tensor([c for c, ps in enumerate(per_class) for _ in ps])
    chosen_real = select_real_indices(labels, len(CLASSES), real_per_class, 0)
    real_features = reference_features([paths[i] for i in chosen_real], 16, 3, encode)
    real_centroids = class_centroids(real_features, labels[chosen_real], len(CLASSES))
    expected = s3_search(features, real_centroids, alpha=alpha, beta=beta)
    manifest = json.loads((out / "manifest.json").read_text())
    selection = manifest["selection"]
    assert [selection["chosen"][c] for c in CLASSES] == expected.chosen.tolist()
    assert [selection["start"][c] for c in CLASSES] == expected.start.tolist()
    assert selection["objective"]["total"] == pytest.approx(expected.objective.total, abs=1e-4)
    assert selection["objective"]["own_term"] == pytest.approx(expected.objective.own_term, abs=1e-4)
    assert selection["passes"] == expected.passes
    for c, group in zip(CLASSES, expected.chosen.tolist()):
        assert sorted(os.listdir(out / c)) == [f"{j:05d}.png" for j in range(IPC)]
        for j in range(IPC):
            candidate = os.path.join(candidates, c, f"{group * IPC + j:05d}.png")
            assert (out / c / f"{j:05d}.png").read_bytes() == open(candidate, "rb").read()
    return manifest, expected


def test_the_selection_is_a_direct_s3_search_of_the_candidate_pngs_and_the_manifest_records_it(models, real_dir, tmp_path):
    out = tmp_path / "out"
    assert run_distill(_parse(s3_args(models, real_dir, out, "--real-per-class", "3"))) == 0
    ve = models["ve_model"]
    manifest, expected = check_against_direct_search(out, real_dir, ve.features, 3)
    # OUT is an ordinary image folder: the candidates are beside it, not inside.
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == sorted(CLASSES + ["manifest.json", "preview.png"])
    selection = manifest["selection"]
    assert (selection["groups"], selection["closeness_weight"], selection["separation_weight"], selection["eps"]) == (
        GROUPS, 0.4, 0.9, 0.0)
    assert selection["encoder"] == {"kind": "ve", "path": models["ve"]}
    assert selection["real"]["path"] == real_dir and selection["real"]["images"] == 3 * len(CLASSES)
    assert selection["candidates"] == candidates_of(out)
    objective = selection["objective"]
    assert objective["total"] == pytest.approx(0.4 * objective["own_term"] + 0.9 * objective["pair_term"])
    assert objective["total"] >= selection["start_objective"]["total"]
    settings = manifest["settings"]
    assert (settings["selection"]["method"], settings["selection"]["s3"]["groups"], settings["job"]["ipc"],
            settings["selection"]["s3"]["real_per_class"]) == ("s3", GROUPS, IPC, 3)
    assert len(manifest["images"]) == IPC * len(CLASSES)
    for entry in manifest["images"]:  # each output image carries its candidate's seeds and index
        group = selection["chosen"][entry["class"]]
        assert entry["subgroup"] == group and entry["generated_indices"] == [group * IPC + entry["index"]]
    # The candidates are a plain distill of G x IPC with the same seed: subgroup 0 is the plain run's images' seeds.
    candidates_manifest = json.loads(open(os.path.join(candidates_of(out), "manifest.json")).read())
    assert candidates_manifest["settings"]["job"]["ipc"] == GROUPS * IPC and "selection" not in candidates_manifest["settings"]
    seeds = {(e["class"], e["index"]): e["seeds"] for e in candidates_manifest["images"]}
    for entry in manifest["images"]:
        assert entry["seeds"] == seeds[(entry["class"], entry["generated_indices"][0])]

    # A rerun finds every stage done and rewrites nothing.
    before = file_states(out)
    again = distill_with_selection(distill_config(
        models["ve"], str(out), IPC, prior=models["prior"], composite=1, batch_size=4, steps=STEPS, seed=5,
        scale=2.0, beta=0.3, device="cpu", progress=False, method="s3", groups=GROUPS, real=real_dir,
        real_per_class=3), log=lambda message: None)
    assert again["run"]["images_written"] == 0 and again["run"]["candidates"]["samples_generated"] == 0
    assert file_states(out) == before

    # The checkpoint encoder, on the same candidates (--candidates): only the stage files are recomputed.
    torch.manual_seed(3)
    resnet = build_resnet("resnet18", num_classes=1000, softplus_beta=None)
    with torch.no_grad():
        for module in resnet.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 1.5)
    checkpoint = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), checkpoint)
    other = tmp_path / "other"
    argv = s3_args(models, real_dir, other, "--select-encoder", str(checkpoint), "--candidates", candidates_of(out),
                   "--select-beta", "0.5")
    candidate_states = file_states(candidates_of(out))
    assert run_distill(_parse(argv)) == 0
    assert file_states(candidates_of(out)) == candidate_states  # the candidates were reused, not resampled
    os.rename(candidates_of(out), candidates_of(other))  # where check_against_direct_search looks
    trunk = resnet.eval()
    preprocess = EncoderPreprocess(224, IMAGENET_MEAN, IMAGENET_STD)
    manifest, _ = check_against_direct_search(other, real_dir, lambda x: trunk.forward_features(preprocess(x)),
                                              REAL_PER_CLASS, beta=0.5)
    assert manifest["selection"]["encoder"]["kind"] == "checkpoint"
    assert manifest["selection"]["encoder"]["arch"] == "resnet18"
    assert manifest["selection"]["encoder"]["path"] == str(checkpoint)


# ---- SIGKILL at every stage -------------------------------------------------------------------------

# Small fixed batches (several per stage) and, with S3_TEST_SLOW, a pause per batch and per copied file,
# so a kill lands inside each stage. The reference runs with the same batches.
SMALL_BATCHES = {"FEATURE_BATCH": 4, "REAL_BATCH": 4, "REAL_CHECKPOINT_BATCHES": 1}
WRAPPER = """
import os, sys, time
import igds_fast.distill.select_stage as stage
from igds_fast.models.feature_encoder import FeatureEncoder
for name, value in {batches!r}.items():
    setattr(stage, name, value)
slow = float(os.environ.get("S3_TEST_SLOW", "0"))
encode, write = FeatureEncoder.__call__, stage.write_bytes_atomic
def slow_encode(self, images):
    time.sleep(slow)
    return encode(self, images)
def slow_write(path, data):
    time.sleep(slow)
    write(path, data)
FeatureEncoder.__call__ = slow_encode
stage.write_bytes_atomic = slow_write
from igds_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_in_each_stage_then_rerun_gives_the_uninterrupted_bytes(models, real_dir, tmp_path, monkeypatch):
    for name, value in SMALL_BATCHES.items():
        monkeypatch.setattr(select_stage, name, value)
    reference = tmp_path / "reference"
    assert run_distill(_parse(s3_args(models, real_dir, reference))) == 0

    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(batches=SMALL_BATCHES))
    out = tmp_path / "killed"
    stage_dir = os.path.join(candidates_of(out), ".s3")
    command = [sys.executable, str(wrapper), "distill", *s3_args(models, real_dir, out)]
    env = {**ENV, "S3_TEST_SLOW": "0.2", "IGDS_DATA_WORKERS": "0"}

    def count(folder, suffix):
        return sum(n.endswith(suffix) for _, _, names in os.walk(folder) for n in names) if os.path.isdir(folder) else 0

    stages = [  # (stage, when to kill, what must not exist yet)
        ("candidates", lambda: len(file_states(candidates_of(out))) >= 2, os.path.join(candidates_of(out), "manifest.json")),
        ("features", lambda: count(os.path.join(stage_dir, "features"), ".safetensors") >= 2,
         os.path.join(stage_dir, "real_centroids.safetensors")),
        ("real centroids", lambda: os.path.isfile(os.path.join(stage_dir, "real_partial.safetensors")),
         os.path.join(stage_dir, "real_centroids.safetensors")),
        ("copy", lambda: count(out, ".png") >= 2, out / "manifest.json"),
    ]
    for stage, ready, absent in stages:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while not ready() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 0.2))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed in {stage}"
        assert not os.path.exists(absent), stage
    result = subprocess.run(command, env={**env, "S3_TEST_SLOW": "0"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for folder, expected in ((out, reference), (candidates_of(out), candidates_of(reference))):
        assert [n for _, _, names in os.walk(folder) for n in names if n.endswith(".tmp")] == []
        assert listing(folder) == listing(expected)  # images, settings, stage files (not the timed manifest)
    killed, uninterrupted = (json.loads((folder / "manifest.json").read_text()) for folder in (out, reference))
    for key in ("images", "selection", "classes", "pixel_settings"):
        if key == "selection":
            killed[key].pop("candidates"), uninterrupted[key].pop("candidates")
        assert killed[key] == uninterrupted[key], key


def test_two_torchrun_ranks_write_the_same_folders_as_one(models, real_dir, tmp_path):
    one = tmp_path / "one"
    assert run_distill(_parse(s3_args(models, real_dir, one))) == 0
    two = tmp_path / "two"
    result = subprocess.run(torchrun_command(2, s3_args(models, real_dir, two)), env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert listing(two) == listing(one)
    assert listing(candidates_of(two)) == listing(candidates_of(one))
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["run"]["candidates"]["world_size"] == 2
    assert all(rank["images_written"] > 0 for rank in manifest["run"]["candidates"]["ranks"])


# ---- refusals -------------------------------------------------------------------------------------


def test_bad_selection_input_is_one_line_before_any_sampling(models, real_dir, tmp_path):
    out = tmp_path / "never"
    (tmp_path / "a_file").write_text("x")
    plain = ["--prior", models["prior"], "--ve", models["ve"], "--ipc", "1", "--steps", "2", "--out", str(out)]
    selected = plain + ["--select", "s3", "--real", real_dir]
    cases = [
        (plain + ["--groups", "3"], "--groups applies to --select s3 only"),
        (plain + ["--real", real_dir, "--select-alpha", "1"], "--select-closeness-weight, --real apply to --select s3 only"),
        (plain + ["--candidates", str(tmp_path / "c")], "--candidates applies to --select s3 only"),
        (plain + ["--select", "s3"], "--select s3 needs --real DIR"),
        (selected + ["--groups", "0"], "S3 groups must be an integer >= 1"),
        (selected + ["--select-beta", "-1"], "S3 separation_weight must be >= 0"),
        (selected + ["--select-separation-weight", "-1"], "S3 separation_weight must be >= 0"),
        (selected + ["--real-per-class", "0"], "S3 real_per_class must be an integer >= 1"),
        (plain + ["--select", "s3", "--real", str(tmp_path / "nope")], "is not a folder"),
        (selected + ["--select-encoder", str(tmp_path / "nope.pth")], "--select-encoder checkpoint not found"),
        (selected + ["--select-encoder", models["ve"]], "is not a torchvision-layout ResNet-18 or ResNet-50"),
        (selected + ["--candidates", str(out / "cands")], "must not be inside the output folder"),
        (selected + ["--candidates", str(out)], "must not be inside the output folder"),
        (selected + ["--classes", "cat,yak"], "'yak' is not in the VE's class list"),
        (plain[:-1] + [str(tmp_path / "a_file"), "--select", "s3", "--real", real_dir], "exists and is not a folder"),
    ]
    for argv, message in cases:
        with pytest.raises(IGDSInputError, match=message) as info:
            args = _parse(argv)
            args.handler(args)
        assert "\n" not in str(info.value), argv
    assert not os.path.exists(out) and not os.path.exists(candidates_of(out))
    # A real folder without a class of the run.
    partial = tmp_path / "partial_real"
    os.makedirs(partial / "cat")
    save_png_atomic(partial / "cat" / "0.png", torch.zeros(3, 8, 8))
    with pytest.raises(IGDSInputError, match="class 'dog' has no folder"):
        run_distill(_parse(plain + ["--select", "s3", "--real", str(partial)]))
    # distill() itself samples only: a config asking for a selection is refused, not silently sampled plainly.
    with pytest.raises(IGDSInputError, match="distill_with_selection"):
        distill(distill_config(models["ve"], str(out), 1, prior=models["prior"], method="s3", real=real_dir))
    assert not os.path.exists(out)


def test_a_plain_output_folder_is_refused_before_the_candidates_are_sampled(models, real_dir, tmp_path):
    out = tmp_path / "plain"
    distill(distill_config(models["ve"], str(out), 1, prior=models["prior"], steps=2, composite=1, device="cpu",
                           progress=False, classes="cat"))
    saved = (out / CONFIG_NAME).read_text()
    argv = ["--prior", models["prior"], "--ve", models["ve"], "--ipc", "1", "--steps", "2", "--composite", "1",
            "--classes", "cat", "--out", str(out), "--device", "cpu", "--quiet", "--select", "s3", "--real", real_dir]
    with pytest.raises(IGDSInputError, match=r"another configuration: select \(folder: null"):
        run_distill(_parse(argv))
    assert not os.path.exists(candidates_of(out)) and (out / CONFIG_NAME).read_text() == saved
