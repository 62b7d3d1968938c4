"""The distill command: outputs, labels, composites, resume (SIGKILL included), refusals, bad input."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from factories import FakeStream, randomize_, tiny_ve
from igds_fast.guidance import GuidanceConfig
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast import cli
from igds_fast.cli.distill import run as run_distill
from igds_fast.sampling.compiled.config import CompileConfig
from igds_fast.settings import replace
from igds_fast.distill import BATCH_NAME, CONFIG_NAME, distill, distill_config
from igds_fast.errors import IGDSInputError
from igds_fast.imageio import make_composite, to_uint8
from igds_fast.models.adm import ADMUNet
from igds_fast.progress import Progress, format_duration
from igds_fast.sampling import Sampler
from igds_fast.seeding import image_seed
from igds_fast.models.priors import save_prior
from igds_fast.train_prior import PriorTrainConfig

CLASSES = ["cat", "dog", "owl", "emu"]
STEPS = 6
ARCH = PriorTrainConfig(num_channels=32, channel_mult="1,2", num_res_blocks=1, noise_schedule="linear")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random-weight prior (our format, its own class list) and a VE over a subset, on disk."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(1234)
    flags = ARCH.unet_flags(16, 3, 5)
    unet = randomize_(ADMUNet.from_flags(**flags), 0.05).eval()
    prior_path = folder / "prior.safetensors"
    # The prior knows one more class than the VE, in another order: labels must be mapped by name.
    save_prior(prior_path, unet, flags, ARCH.schedule_config(), ["emu", "yak", "dog", "cat", "owl"])
    ve = tiny_ve(num_classes=4, channels=3, resolution=16)
    ve.class_names = list(CLASSES)
    ve_path = folder / "ve.safetensors"
    ve.save(ve_path)
    return {"prior": str(prior_path), "ve": str(ve_path), "unet": unet, "ve_model": ve, "folder": folder}


def make_config(models, out, ipc=2, **overrides):
    """The tests' run: settings named as igds_fast.settings.replace names them (field, or path)."""
    settings = dict(prior=models["prior"], steps=STEPS, batch_size=4, seed=3, scale=2.0, beta=0.5, device="cpu",
                    progress=False)
    settings.update(overrides)
    return distill_config(models["ve"], str(out), ipc, **settings)


def png_pixels(path):
    with Image.open(path) as image:
        return np.asarray(image)


def listing(folder):
    """{relative path: bytes} of every file under folder except the manifest (run timings inside)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != "manifest.json":
                with open(path, "rb") as handle:
                    files[relative] = handle.read()
    return files


def file_states(folder):
    """{png path: (inode, mtime_ns)}: what a rewrite (a new file renamed over the old) would change."""
    states = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".png") and name != "preview.png":
                stat = os.stat(os.path.join(root, name))
                states[os.path.relpath(os.path.join(root, name), folder)] = (stat.st_ino, stat.st_mtime_ns)
    return states


# ---- what is written ------------------------------------------------------------------------------


def test_images_are_the_samplers_output_with_mapped_labels(models, tmp_path):
    manifest = distill(make_config(models, tmp_path / "out", classes="dog,cat", composite=1))
    # Selection order: dog then cat. VE labels are positions in the VE list; prior labels in the prior's.
    assert [(c["name"], c["label"], c["prior_label"]) for c in manifest["classes"]] == [("dog", 1, 2), ("cat", 0, 3)]
    schedule = DiffusionSchedule(ScheduleConfig("linear", 1000, str(STEPS), "small"))
    sampler = Sampler(models["unet"], schedule, models["ve_model"], GuidanceConfig(scale=2.0, beta=0.5),
                      prior_class_map=[3, 2, 4, 0], noise="torch")
    seeds = [image_seed(3, "cat", 1), image_seed(3, "dog", 0)]
    expected = sampler.sample([0, 1], seeds)
    assert expected.std() > 0.05
    for image, relative in zip(expected, ["cat/00001.png", "dog/00000.png"]):
        written = png_pixels(tmp_path / "out" / relative)
        assert np.abs(written.astype(int) - to_uint8(image).astype(int)).max() <= 1  # batch rounding only
    entry = [e for e in manifest["images"] if e["path"] == os.path.join("cat", "00001.png")][0]
    assert entry["seeds"] == [seeds[0]] and entry["label"] == 0 and entry["prior_label"] == 3


def test_composites_exact_ipc_and_manifest(models, tmp_path):
    out = tmp_path / "out"
    manifest = distill(make_config(models, out, ipc=3, composite=4, batch_size=8))
    for name in CLASSES:
        assert sorted(os.listdir(out / name)) == ["00000.png", "00001.png", "00002.png"]
    assert sorted(n for n in os.listdir(out) if not os.path.isdir(out / n)) == [CONFIG_NAME, "manifest.json", "preview.png"]
    # A composite is the 2x2 grid of its four samples, generated indices 4i..4i+3, row-major.
    schedule = DiffusionSchedule(ScheduleConfig("linear", 1000, str(STEPS), "small"))
    sampler = Sampler(models["unet"], schedule, models["ve_model"], GuidanceConfig(scale=2.0, beta=0.5),
                      prior_class_map=[3, 2, 4, 0], noise="torch")
    samples = sampler.sample([2] * 4, [image_seed(3, "owl", g) for g in range(4, 8)])
    composite = to_uint8(make_composite(samples)).astype(int)
    written = png_pixels(out / "owl" / "00001.png").astype(int)
    assert written.shape == (16, 16, 3)
    assert np.abs(written - composite).max() <= 1
    quadrant = to_uint8(samples[2]).astype(int)[::2, ::2]  # bottom-left is sample 2 at half size
    assert np.abs(written[8:, :8] - quadrant).mean() < np.abs(written[8:, :8] - to_uint8(samples[1])[::2, ::2]).mean()

    with open(out / "manifest.json") as handle:
        on_disk = json.load(handle)
    assert on_disk["images"] == manifest["images"]
    assert len(manifest["images"]) == 12
    owl = [e for e in manifest["images"] if e["path"] == os.path.join("owl", "00001.png")][0]
    assert owl["generated_indices"] == [4, 5, 6, 7] and owl["label"] == 2 and owl["prior_label"] == 4
    assert owl["seeds"] == [image_seed(3, "owl", g) for g in range(4, 8)]
    settings = manifest["settings"]
    assert (settings["job"]["ipc"], settings["job"]["composite"], settings["guidance"]["scale"],
            settings["guidance"]["beta"], settings["sampler"]["steps"]) == (3, 4, 2.0, 0.5, STEPS)
    assert settings["guidance"]["beta_source"] == "given"
    assert manifest["versions"]["torch"] == torch.__version__
    run = manifest["run"]
    assert run["images_written"] == 12 and run["samples_generated"] == 48 and run["images_per_s"] > 0
    assert manifest["pixel_settings"]["prior_fingerprint"]["sha256"]
    preview = png_pixels(out / "preview.png")
    assert preview.shape == (2 + 4 * 18, 2 + 3 * 18, 3)  # 4 class rows x 3 images, 2-pixel gutters


# ---- resume ---------------------------------------------------------------------------------------


def test_rerun_skips_finished_images_and_rewrites_nothing(models, tmp_path):
    out = tmp_path / "out"
    distill(make_config(models, out, ipc=2, composite=1, batch_size=3))
    before = file_states(out)
    contents = listing(out)
    assert len(before) == 8
    again = distill(make_config(models, out, ipc=2, composite=1, batch_size=3))
    assert again["run"]["images_written"] == 0 and again["run"]["samples_generated"] == 0
    assert file_states(out) == before
    # Lose two images (as if their batch had been in flight): only they are made again, identically.
    os.unlink(out / "dog" / "00001.png")
    os.unlink(out / "emu" / "00000.png")
    resumed = distill(make_config(models, out, ipc=2, composite=1, batch_size=3))
    assert resumed["run"]["images_written"] == 2
    after = file_states(out)
    for path, state in before.items():
        if path not in (os.path.join("dog", "00001.png"), os.path.join("emu", "00000.png")):
            assert after[path] == state, path
    assert listing(out) == contents  # byte for byte, preview and config included


def test_a_gamma_folder_resumes_with_the_batch_size_it_was_started_with(models, tmp_path):
    # gamma couples the images of one class within a batch: the batch size is part of the pixels.
    out = tmp_path / "out"
    settings = dict(ipc=2, composite=1, gamma=0.5)
    reference = tmp_path / "reference"
    distill(make_config(models, reference, batch_size=3, **settings))
    distill(make_config(models, out, batch_size=3, **settings))
    with open(out / BATCH_NAME) as handle:
        assert json.load(handle) == {"batch_size": 3}
    os.unlink(out / "dog" / "00001.png")
    before = file_states(out)
    with pytest.raises(IGDSInputError, match=r"started with batch size 3 .* --batch-size 3") as info:
        distill(make_config(models, out, batch_size=4, **settings))
    assert "\n" not in str(info.value) and file_states(out) == before
    resumed = distill(make_config(models, out, batch_size=None, **settings))  # no size given: the saved one
    assert resumed["run"]["batch_size"] == 3 and resumed["run"]["images_written"] == 1
    assert listing(out) == listing(reference)
    # gamma 0: images do not depend on their batch, nothing is saved or enforced
    plain = tmp_path / "plain"
    distill(make_config(models, plain, batch_size=3, ipc=1, composite=1))
    assert not (plain / BATCH_NAME).exists()


def _distill_args(models, out):
    return [
        "--prior", models["prior"], "--ve", models["ve"],
        "--ipc", "4", "--composite", "4", "--batch-size", "4", "--steps", str(STEPS), "--seed", "11",
        "--scale", "3", "--beta", "0.2", "--out", str(out), "--device", "cpu", "--quiet",
    ]


def _distill_command(models, out):
    return [sys.executable, "-m", "igds_fast", "distill", *_distill_args(models, out)]


def test_sigkill_at_a_random_moment_then_rerun_equals_an_uninterrupted_run(models, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    # The uninterrupted run, in this process (one thread, like the subprocesses): the same parser and code.
    assert run_distill(_parse(_distill_args(models, reference))) == 0
    total = 4 * 4
    assert len(file_states(reference)) == total

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_distill_command(models, interrupted), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(file_states(interrupted)) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.3))  # a random moment: mid-batch, mid-write or between batches
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_at_kill = len(file_states(interrupted))
    assert 2 <= done_at_kill < total
    assert not os.path.exists(interrupted / "manifest.json")
    assert os.path.exists(interrupted / CONFIG_NAME)  # written first

    subprocess.run(_distill_command(models, interrupted), env=env, check=True, capture_output=True, timeout=300)
    leftovers = [name for _, _, names in os.walk(interrupted) for name in names if name.endswith(".tmp")]
    assert leftovers == []
    assert listing(interrupted) == listing(reference)
    with open(interrupted / "manifest.json") as a, open(reference / "manifest.json") as b:
        resumed_manifest, reference_manifest = json.load(a), json.load(b)
    resumed_manifest["settings"]["run"].pop("out"), reference_manifest["settings"]["run"].pop("out")
    for key in ("settings", "pixel_settings", "classes", "images", "prior", "ve"):
        assert resumed_manifest[key] == reference_manifest[key], key
    assert resumed_manifest["run"]["images_written"] == total - done_at_kill


# ---- refusals and --force -------------------------------------------------------------------------


def test_other_settings_are_refused_naming_the_setting_and_force_clears(models, tmp_path):
    out = tmp_path / "out"
    distill(make_config(models, out, composite=1))
    before = file_states(out)
    for overrides, setting in [({"scale": 1.0}, "scale"), ({"beta": 0.1}, "beta"), ({"seed": 4}, "seed"),
                               ({"ipc": 3}, "ipc"), ({"steps": 5}, "diffusion"), ({"classes": "cat,dog"}, "classes"),
                               ({"composite": 4}, "composite")]:
        with pytest.raises(IGDSInputError, match=rf"another configuration: {setting} \(folder: .*, now: .*--force") as info:
            distill(make_config(models, out, **{"composite": 1, **overrides}))
        assert "\n" not in str(info.value)
    assert file_states(out) == before  # a refused run touched nothing
    forced = distill(make_config(models, out, composite=1, seed=4, ipc=1, force=True))
    assert forced["run"]["images_written"] == 4
    assert sorted(os.listdir(out / "cat")) == ["00000.png"]  # the old IPC-2 images are gone
    with open(out / CONFIG_NAME) as handle:
        assert json.load(handle)["seed"] == 4


def test_torch_noise_folders_resume_only_on_the_same_noise_source(models, tmp_path):
    out = tmp_path / "out"
    distill(make_config(models, out, composite=1))
    with open(out / CONFIG_NAME) as handle:
        saved = json.load(handle)
    assert saved["noise"] == "torch" and saved["noise_source"] == "cpu"
    saved["noise_source"] = "cuda (NVIDIA H100 80GB HBM3)"  # as if started on a GPU
    with open(out / CONFIG_NAME, "w") as handle:
        json.dump(saved, handle)
    before = file_states(out)
    with pytest.raises(IGDSInputError, match=r"noise_source \(folder: \"cuda \(NVIDIA H100.*now: \"cpu\"\)"):
        distill(make_config(models, out, composite=1))
    assert file_states(out) == before
    philox = tmp_path / "philox"
    distill(make_config(models, philox, composite=1, ipc=1, noise="philox"))
    with open(philox / CONFIG_NAME) as handle:
        assert "noise_source" not in json.load(handle)  # philox noise is the same on every device


def test_a_foreign_non_empty_folder_is_refused(models, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(IGDSInputError, match="not empty and was not written by distill"):
        distill(make_config(models, out))
    assert os.listdir(out) == ["notes.txt"]


# ---- bad input ------------------------------------------------------------------------------------


def _parse(argv):
    """`igds-fast distill ARGV` parsed as the command line parses it (no models: the demo's parser)."""
    return cli.parse(["distill", *argv])


def test_bad_input_is_one_line_before_any_sampling(models, tmp_path):
    other_ve = tiny_ve(num_classes=2, channels=3)
    other_ve.class_names = ["cat", "gnu"]
    foreign_ve = tmp_path / "foreign_ve.safetensors"
    other_ve.save(foreign_ve)
    class_file = tmp_path / "classes.txt"
    class_file.write_text("owl\nyak\n")
    out = str(tmp_path / "never")
    base = ["--prior", models["prior"], "--ve", models["ve"], "--out", out, "--steps", "4"]
    cases = [
        (base + ["--ipc", "0"], "IPC must be a positive integer, got 0"),
        (base + ["--ipc", "-1"], "IPC must be a positive integer"),
        (base + ["--ipc", "1", "--steps", "0"], "steps must be a positive integer"),
        (base + ["--ipc", "1", "--batch-size", "0"], "batch size must be a positive integer"),
        (base + ["--ipc", "1", "--composite", "4", "--batch-size", "2"], "cannot hold one composite"),
        (["--prior", models["prior"], "--ve", str(tmp_path / "nope.safetensors"), "--ipc", "1", "--out", out],
         "VE bundle not found"),
        (["--prior", str(tmp_path / "nope.pt"), "--ve", models["ve"], "--ipc", "1", "--out", out], "prior checkpoint not found"),
        (["--prior", models["ve"], "--ve", models["ve"], "--ipc", "1", "--out", out], "not an igds prior.*--arch"),
        (["--prior", str(tmp_path / "nope.pt"), "--preset", "adm256-cond", "--ve", models["ve"], "--ipc", "1",
          "--out", out], "prior checkpoint not found"),
        (["--prior", models["prior"], "--ve", str(foreign_ve), "--ipc", "1", "--out", out],
         "VE class.* not in the prior's class list.*gnu"),
        (base + ["--ipc", "1", "--classes", "cat,gnu"], "'gnu' is not in the prior's class list"),
        (base + ["--ipc", "1", "--classes", str(class_file)], "'yak' is not in the VE's class list"),
        (base + ["--ipc", "1", "--beta-table", str(tmp_path / "nope.json")], "beta table not found"),
        (base + ["--ipc", "1", "--scale", "-1"], "scale must be >= 0"),
        (["--ve", models["ve"], "--ipc", "1", "--out", out], "give exactly one prior"),
        (["--prior", models["prior"], "--ipc", "1", "--out", out], "the following arguments are required: --ve"),
        (["--prior", models["prior"], "--ve", models["ve"], "--out", out], "arguments are required: --ipc"),
        (["--preset", "adm256-cond"], "--preset applies to a distillation run \\(--prior/--ve\\)"),
        (base + ["--ipc", "1", "--compile-dtype", "fp16"], "--compile-dtype applies to --backend compiled only"),
        (base + ["--ipc", "1", "--backend", "compiled", "--compile-options", "{nope"], "--compile-options: not valid JSON"),
        (base + ["--ipc", "1", "--backend", "compiled", "--compile-options", "[1]"], "must be a JSON object"),
        (base + ["--ipc", "1", "--backend", "compiled", "--compile-options", '{"graphs": 1}'],
         "--compile-options: unknown setting\\(s\\) graphs"),
        (base + ["--ipc", "1", "--backend", "compiled", "--compile-options", '{"batch_size": 8}'],
         "--compile-options: unknown setting\\(s\\) batch_size"),  # the run's --batch-size is the one
        (base + ["--ipc", "1", "--backend", "compiled", "--compile-options", '{"dtype": "int4"}'], "compile dtype"),
    ]
    for argv, message in cases:
        with pytest.raises(IGDSInputError, match=message) as info:
            args = _parse(argv)
            args.handler(args)
        assert "\n" not in str(info.value), argv
    assert not os.path.exists(out)  # nothing was created by any refused run


def test_beta_defaults_to_the_placeholder_table_and_reads_a_calibrated_table(models, tmp_path):
    from igds_fast.guidance.beta_table import DEFAULT_BETA_TABLE

    table = tmp_path / "beta.json"
    table.write_text(json.dumps({"beta_per_ipc": {"1": 0.25, "2": 0.75}}))
    manifest = distill(make_config(models, tmp_path / "a", ipc=2, beta=None, beta_table=str(table), classes="emu",
                                   composite=1))
    guidance = manifest["settings"]["guidance"]
    assert guidance["beta"] == 0.75 and guidance["beta_source"].startswith("table")
    manifest = distill(make_config(models, tmp_path / "b", ipc=1, beta=None, classes="emu", composite=1))
    assert manifest["settings"]["guidance"]["beta"] == DEFAULT_BETA_TABLE[1]
    assert "placeholder" in manifest["settings"]["guidance"]["beta_source"]


def test_adm_preset_checkpoints_use_imagenet_labels_and_composites(models, tmp_path, monkeypatch):
    """An ADM checkpoint path: ImageNet-1K labels by wnid, composites by default (paper presets)."""
    from safetensors.torch import save_file

    from igds_fast.classes import class_list, imagenet_wnids
    from igds_fast.models import adm

    tiny_flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                      class_cond=True, learn_sigma=True, num_head_channels=16, use_scale_shift_norm=True,
                      resblock_updown=True)
    monkeypatch.setitem(adm.ADM_PRESETS, "tiny-cond", tiny_flags)
    monkeypatch.setitem(adm.ADM_DIFFUSION_FLAGS, "tiny-cond", dict(noise_schedule="linear", diffusion_steps=1000))
    unet = randomize_(adm.ADMUNet.from_flags(**tiny_flags), 0.05)
    checkpoint = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(checkpoint))
    woof = class_list("imagewoof")
    ve = tiny_ve(num_classes=len(woof), channels=3)
    ve.class_names = list(woof)
    ve_path = tmp_path / "woof_ve.safetensors"
    ve.save(ve_path)
    config = distill_config(str(ve_path), str(tmp_path / "out"), 1, prior=str(checkpoint), arch="tiny-cond",
                            classes="imagewoof", steps=3, batch_size=8, scale=1.0, beta=0.1, progress=False)
    manifest = distill(config)
    assert manifest["settings"]["job"]["composite"] == 4
    assert [c["prior_label"] for c in manifest["classes"]] == [imagenet_wnids().index(w) for w in woof]
    assert sorted(os.listdir(tmp_path / "out" / woof[0])) == ["00000.png"]
    with pytest.raises(IGDSInputError, match="'n01440764' is not in the VE's class list"):
        distill(replace(config, classes="imagenette", out=str(tmp_path / "x")))


# ---- progress -------------------------------------------------------------------------------------


def test_progress_bar_on_a_tty_and_log_lines_elsewhere():
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    tty = FakeStream(True)
    bar = Progress(10, stream=tty, initial=2, clock=clock, min_interval_s=0.0)
    now[0] = 4.0
    bar.update(4)  # 4 images in 4 s this run: 1 img/s, 4 left -> ETA 4 s
    bar.close()
    assert "\r[" in tty.text and "6/10 img (60%) 1.00 img/s ETA 4s" in tty.text and tty.text.endswith("\n")

    log = FakeStream(False)
    lines = Progress(3, stream=log, clock=clock, log_interval_s=100.0)
    for _ in range(3):
        now[0] += 1.0
        lines.update(1)
    lines.close()
    assert "\r" not in log.text and "\x1b" not in log.text
    assert log.text.splitlines()[0].startswith("1/3 img") and log.text.splitlines()[-1].startswith("3/3 img")
    assert format_duration(3725) == "1h02m" and format_duration(float("inf")) == "?"


def test_an_unconditional_diffusers_prior_samples_every_ve_class(models, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    randomize_(model, 0.05).save_pretrained(tmp_path / "unet")
    config = distill_config(models["ve"], str(tmp_path / "out"), 1, diffusers=str(tmp_path / "unet"), steps=3,
                            batch_size=4, scale=1.0, beta=0.2, progress=False)
    manifest = distill(config)
    assert manifest["prior"] == {"kind": "diffusers", "path": str(tmp_path / "unet"), "preset": None,
                                 "variance": "fixed_large", "conditional": False, "num_classes": None}
    assert [(c["name"], c["label"], c["prior_label"]) for c in manifest["classes"]] == [
        ("cat", 0, None), ("dog", 1, None), ("owl", 2, None), ("emu", 3, None)]
    assert manifest["settings"]["job"]["composite"] == 1  # composites default on for the ADM paper presets only
    assert manifest["pixel_settings"]["diffusion"]["fixed_variance"] == "large"
    pixels = [png_pixels(tmp_path / "out" / name / "00000.png") for name in CLASSES]
    assert all(p.shape == (16, 16, 3) for p in pixels) and pixels[0].std() > 1
    assert not np.array_equal(pixels[0], pixels[1])


# ---- the compiled backend --------------------------------------------------------------------------


def test_compiled_backend_chooses_its_batch_pads_the_last_and_matches_eager(models, tmp_path, monkeypatch):
    # fp32 copies without torch.compile: the compiled step's logic at CPU cost. No batch size given:
    # the backend's choice (8 on CPU). 3 classes x IPC 4 = 12 samples: a batch of 8, then the four owls
    # padded to 8 — with gamma > 0 the owls form one diversity group that no filler may join.
    options = {"dtype": "fp32", "compile": False, "channels_last": False}
    common = dict(classes="cat,dog,owl", ipc=4, composite=1, gamma=0.4)
    calls = []
    original_sample = Sampler.sample

    def recording_sample(self, labels, seeds, group_ids=None, pad_to=None, **options):
        calls.append((len(labels), pad_to))
        return original_sample(self, labels, seeds, group_ids, pad_to, **options)

    monkeypatch.setattr(Sampler, "sample", recording_sample)
    manifest = distill(make_config(models, tmp_path / "compiled", backend__name="compiled",
                                   backend__compile=CompileConfig(**options), batch_size=None, **common))
    assert manifest["run"]["batch_size"] == 8 and manifest["run"]["samples_generated"] == 12
    # The first-step self-check's measured errors are part of the run's record.
    assert set(manifest["run"]["ranks"][0]["self_check"]) == {"unet", "features", "head", "gradient", "step"}
    assert calls == [(8, None), (4, 8)]  # the short batch after a full one is padded to it
    del calls[:]
    distill(make_config(models, tmp_path / "single", backend__name="compiled", backend__compile=options,
                        batch_size=None, classes="cat", ipc=3, composite=1))
    assert calls == [(3, None)]  # a run whose only batch is short runs at its own size
    config = json.loads((tmp_path / "compiled" / CONFIG_NAME).read_text())
    assert config["compile"] == {"dtype": "fp32", "encoder_dtype": "fp32"} and config["noise"] == "philox"
    # The eager reference with the same Philox noise and the same batches (8 + 4, no padding): the
    # fillers changed no real image, although gamma couples the images of a class within a batch.
    distill(make_config(models, tmp_path / "eager", noise="philox", batch_size=8, **common))
    for name in ("cat", "dog", "owl"):
        for index in range(4):
            relative = os.path.join(name, f"{index:05d}.png")
            compiled = png_pixels(tmp_path / "compiled" / relative).astype(int)
            eager = png_pixels(tmp_path / "eager" / relative).astype(int)
            assert np.abs(compiled - eager).max() <= 1, relative  # fp32 reordering: one uint8 level at most



def test_a_compiled_run_with_a_numerics_fault_stops_in_one_line_before_writing(models, tmp_path, monkeypatch, capsys):
    # A UNet copy that returns NaN from one block (what a compiler fault looks like to the sampler):
    # the first-step self-check stops `igds-fast distill --backend compiled` with one line, exit 2.
    from igds_fast import cli
    from igds_fast.sampling.compiled import step as compiled_module

    original_copy = compiled_module.low_precision_copy

    def faulty_copy(module, dtype, channels_last):
        duplicate = original_copy(module, dtype, channels_last)
        if isinstance(duplicate, ADMUNet):
            duplicate.middle_block[1].register_forward_hook(lambda m, inputs, output: output * float("nan"))
        return duplicate

    monkeypatch.setattr(compiled_module, "low_precision_copy", faulty_copy)
    out = tmp_path / "faulty"
    options = json.dumps({"dtype": "fp32", "compile": False, "channels_last": False})
    code = cli.main(["distill", "--prior", models["prior"], "--ve", models["ve"], "--ipc", "2", "--steps", str(STEPS),
                     "--backend", "compiled", "--compile-options", options, "--out", str(out), "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("igds-fast:")]
    assert code == 2 and len(errors) == 1 and errors[0] == lines[-1], lines  # after the run's one log line
    assert errors[0].startswith("igds-fast: error: compiled backend self-check failed at the first step"), errors
    assert "module 'middle_block.1' (AttentionBlock)" in errors[0]
    assert not list(out.rglob("*.png"))  # nothing was written


def test_trace_writes_the_guidance_terms_per_class_and_leaves_the_pixels(models, tmp_path):
    from PIL import Image as PILImage

    plain = distill(make_config(models, tmp_path / "plain", classes="dog,cat", composite=1))
    traced = distill(make_config(models, tmp_path / "traced", classes="dog,cat", composite=1, trace=True))
    assert listing(tmp_path / "plain") == {k: v for k, v in listing(tmp_path / "traced").items()
                                           if k not in ("trace.json", "trace.png")}
    assert plain["images"] == traced["images"]
    document = json.loads((tmp_path / "traced" / "trace.json").read_text())
    assert document["terms"] == ["log_p_y", "kl", "infonce", "grad_norm", "top1"]
    assert document["sampling_step"] == list(range(STEPS)) and len(document["timestep"]) == STEPS
    assert document["timestep"] == sorted(document["timestep"], reverse=True)  # from noise to image
    assert set(document["classes"]) == {"dog", "cat"} and document["images"] == {"dog": 2, "cat": 2}
    for terms in document["classes"].values():
        assert all(v is not None and v >= 0 for v in terms["kl"]) and all(v > 0 for v in terms["grad_norm"])
    with PILImage.open(tmp_path / "traced" / "trace.png") as image:
        assert image.size[0] >= 5 * 300 and image.mode == "RGB"
    with pytest.raises(IGDSInputError, match="--trace applies to a distillation run"):
        _parse(["--preset", "digits", "--trace"])


def test_timestep_respacing_and_the_npz_export(models, tmp_path):
    from igds_fast import cli

    out = tmp_path / "respaced"
    args = ["--prior", models["prior"], "--ve", models["ve"], "--ipc", "2", "--classes", "dog,cat", "--composite", "1",
            "--out", str(out), "--device", "cpu", "--quiet", "--timestep-respacing", "3,2"]
    assert cli.main(["distill", *args]) == 0
    settings = json.loads((out / CONFIG_NAME).read_text())
    assert settings["diffusion"]["sampling_steps"] == "3,2"
    with pytest.raises(IGDSInputError, match="argument --steps: not allowed with argument --timestep-respacing"):
        _parse(args + ["--steps", "5"])
    with pytest.raises(IGDSInputError, match="--timestep-respacing applies to a distillation run"):
        _parse(["--preset", "digits", "--timestep-respacing", "ddim5"])
    assert cli.main(["export-npz", str(out), "--out", str(tmp_path / "samples.npz")]) == 0
    with np.load(tmp_path / "samples.npz", allow_pickle=False) as archive:
        images, labels = archive["arr_0"], archive["arr_1"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [entry["prior_label"] for entry in manifest["images"]]
    for k, entry in enumerate(manifest["images"]):
        assert np.array_equal(images[k], png_pixels(out / entry["path"]))
    assert cli.main(["export-npz", str(tmp_path), "--out", str(tmp_path / "x.npz")]) == 2  # no manifest.json
    assert not (tmp_path / "x.npz").exists()
