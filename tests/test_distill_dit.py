"""`igds-fast distill` with a latent prior: a DiT / MinimaxDiffusion checkpoint and a diffusers VAE folder.

Random weights in the real layouts: a MinimaxDiffusion training checkpoint ({"model", "ema", "opt",
"args": Namespace}, DiffFit scales on block 0) of a DiT of DiT-S's width (the head count is read off
the width, as for the original sizes) with ImageNet-1K's 1000 classes, and an AutoencoderKL written
with save_pretrained. The run must be the Sampler's own output (CFG-wrapped DiT, decoder, ImageNet
labels by wnid), resume after SIGKILL byte for byte, and refuse what does not apply in one line.
"""
import argparse
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

from factories import tiny_dit, tiny_vae, tiny_ve
from igds_fast.classes import class_list, imagenet_wnids
from igds_fast import cli
from igds_fast.cli.distill import run as run_distill
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.distill import CONFIG_NAME, distill, distill_config, plan_distill
from igds_fast.errors import IGDSInputError
from igds_fast.guidance import GuidanceConfig
from igds_fast.imageio import to_uint8
from igds_fast.models.cfg import ClassifierFreeGuidance
from igds_fast.models.dit import load_dit
from igds_fast.models.vae import load_vae
from igds_fast.sampling import Sampler
from igds_fast.seeding import image_seed

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
WOOF = class_list("imagewoof")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latent")
    torch.manual_seed(77)
    dit = tiny_dit(input_size=8, depth=2, hidden_size=384, num_heads=6, num_classes=1000, difffit_blocks=1)
    state = dit.state_dict()
    checkpoint = folder / "minimax-dit.pt"
    # MinimaxDiffusion's layout: the EMA is what samples (the raw weights differ), args a Namespace.
    torch.save({"model": {k: torch.randn_like(v) for k, v in state.items()}, "ema": state, "opt": {},
                "args": argparse.Namespace(model="DiT-S/2", image_size=64)}, checkpoint)
    vae = tiny_vae()
    vae.save_pretrained(folder / "vae")
    ve = tiny_ve(num_classes=len(WOOF), channels=3, resolution=16)
    ve.class_names = list(WOOF)
    ve_path = folder / "ve.safetensors"
    ve.save(ve_path)
    return {"prior": str(checkpoint), "vae": str(folder / "vae"), "ve": str(ve_path), "ve_model": ve,
            "folder": folder}


def make_config(models, out, ipc=2, **overrides):
    settings = dict(prior=models["prior"], vae=models["vae"], steps=STEPS, batch_size=4, seed=5, scale=2.0, beta=0.3,
                    cfg_scale=3.0, classes=",".join(WOOF[:2]), device="cpu", progress=False)
    settings.update(overrides)
    return distill_config(models["ve"], str(out), ipc, **settings)


def png_pixels(path):
    with Image.open(path) as image:
        return np.asarray(image)


def listing(folder):
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative != "manifest.json":
                with open(os.path.join(root, name), "rb") as handle:
                    files[relative] = handle.read()
    return files


def pngs(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder)
                  for name in names if name.endswith(".png") and name != "preview.png")


def _parse(argv):
    return cli.parse(["distill", *argv])


# ---- what is written ------------------------------------------------------------------------------


def test_the_run_is_the_samplers_cfg_dit_decoded_by_the_vae_with_imagenet_labels(models, tmp_path):
    out = tmp_path / "out"
    manifest = distill(make_config(models, out))
    assert manifest["pixel_settings"]["prior_kind"] == "dit"
    assert manifest["pixel_settings"]["clip_x0"] is False  # DiT samples with clip_denoised=False
    latent = manifest["pixel_settings"]["latent"]
    assert latent["cfg_scale"] == 3.0 and latent["cfg_channels"] == 3 and latent["vae_fingerprint"]
    assert manifest["settings"]["job"]["composite"] == 1  # one 8x-decoded sample per image
    assert manifest["prior"]["variance"] == "learned_range"  # not the schedule's unused fixed_variance
    assert [c["prior_label"] for c in manifest["classes"]] == [imagenet_wnids().index(w) for w in WOOF[:2]]
    assert pngs(out) == sorted(f"{w}/{i:05d}.png" for w in WOOF[:2] for i in range(2))

    dit = load_dit(models["prior"], preset=None)  # the EMA, architecture read off the shapes
    assert dit.flags["difffit_blocks"] == 1 and dit.flags["num_heads"] == 6
    prior = ClassifierFreeGuidance(dit, 3.0, 3)
    schedule = DiffusionSchedule(ScheduleConfig("linear", 1000, str(STEPS), "large"))
    sampler = Sampler(prior, schedule, models["ve_model"], GuidanceConfig(scale=2.0, beta=0.3, clip_x0=False),
                      prior_class_map=[imagenet_wnids().index(w) for w in WOOF], noise="torch",
                      decoder=load_vae(models["vae"]))
    # The run's first batch: both images of each class, interleaved by the job order.
    jobs = [(c, i) for i in range(2) for c in range(2)]
    images = sampler.sample([c for c, _ in jobs], [image_seed(5, WOOF[c], i) for c, i in jobs])
    assert images.shape == (4, 3, 16, 16)
    for (c, i), image in zip(jobs, images):
        np.testing.assert_array_equal(png_pixels(out / WOOF[c] / f"{i:05d}.png"), to_uint8(image))


def test_steps_default_to_dits_50_and_the_window_and_cfg_change_the_pixels(models, tmp_path):
    plan = plan_distill(make_config(models, tmp_path / "plan", steps=None))
    assert plan.steps == 50 and plan.pixel_settings["diffusion"]["sampling_steps"] == "50"
    full = tmp_path / "full"
    distill(make_config(models, full, ipc=1))
    windowed = tmp_path / "windowed"
    manifest = distill(make_config(models, windowed, ipc=1, guide_from_step=2, guide_until_step=2))
    assert manifest["pixel_settings"]["guide_window"] == [2, 2]
    assert "guide_window" not in json.load(open(full / CONFIG_NAME))  # default: not written (old folders resume)
    no_cfg = tmp_path / "no_cfg"
    distill(make_config(models, no_cfg, ipc=1, cfg_scale=1.0))
    name = f"{WOOF[0]}/00000.png"
    reference = png_pixels(full / name)
    assert not np.array_equal(png_pixels(windowed / name), reference)
    assert not np.array_equal(png_pixels(no_cfg / name), reference)


def test_sigkill_at_a_random_moment_then_rerun_equals_an_uninterrupted_run(models, tmp_path):
    def argv(out):
        return ["--prior", models["prior"], "--prior-kind", "dit", "--vae", models["vae"], "--ve", models["ve"],
                "--classes", ",".join(WOOF[:3]), "--ipc", "3", "--batch-size", "3", "--steps", str(STEPS),
                "--seed", "9", "--scale", "2", "--beta", "0.2", "--cfg-scale", "2.5", "--out", str(out),
                "--device", "cpu", "--quiet"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    assert run_distill(_parse(argv(reference))) == 0
    total = 9
    assert len(pngs(reference)) == total
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "igds_fast", "distill", *argv(interrupted)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while (not interrupted.exists() or len(pngs(interrupted)) < 2) and time.monotonic() < deadline \
            and process.poll() is None:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.2))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_at_kill = len(pngs(interrupted))
    assert 2 <= done_at_kill < total
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
    assert listing(interrupted) == listing(reference)


# ---- refusals -------------------------------------------------------------------------------------


def test_what_does_not_apply_is_refused_in_one_line_before_any_sampling(models, tmp_path):
    out = str(tmp_path / "never")
    base = ["--prior", models["prior"], "--ve", models["ve"], "--ipc", "1", "--out", out, "--steps", "4"]
    adm_like = tmp_path / "ve_as_prior.safetensors"  # any non-DiT file: the refusal comes before reading it
    adm_like.write_bytes(open(models["ve"], "rb").read())
    plain = tiny_dit(input_size=8, depth=1, hidden_size=40, num_heads=2, num_classes=1000).state_dict()
    odd = tmp_path / "odd-width.pt"
    torch.save(plain, odd)
    cases = [
        (base, "a DiT prior samples latents: give --vae DIR"),
        (base + ["--vae", str(tmp_path / "missing")], "is not a diffusers AutoencoderKL folder"),
        (base + ["--vae", models["vae"], "--cfg-channels", "5"], r"--cfg-channels must be in \[1, 4\]"),
        (base + ["--vae", models["vae"], "--cfg-scale", "-1"], "CFG scale must be a finite number >= 0"),
        (base + ["--vae", models["vae"], "--cfg-scale", "inf"], "CFG scale must be a finite number >= 0"),
        (base + ["--vae", models["vae"], "--guide-from-step", "4"], "--guide-from-step 4 is past the last of 4"),
        (base + ["--vae", models["vae"], "--guide-from-step", "3", "--guide-until-step", "2"],
         "guide_until_step must be an integer >= guide_from_step"),
        (base + ["--vae", models["vae"], "--arch", "adm256-cond"], r"--vae applies to a latent \(DiT\) prior only"),
        (base + ["--vae", models["vae"], "--preset", "adm256-cond"], r"--vae applies to a latent \(DiT\) prior only"),
        (base + ["--vae", models["vae"], "--arch", "adm256-cond", "--prior-kind", "dit"],
         "--arch adm256-cond is not a dit preset"),
        (base + ["--vae", models["vae"], "--prior-kind", "adm"], "an ADM checkpoint needs its --arch"),
        (["--prior", str(odd), "--vae", models["vae"], "--ve", models["ve"], "--ipc", "1", "--out", out],
         "a DiT of hidden size 40 .*pass num_heads"),
        (["--prior", str(adm_like), "--ve", models["ve"], "--ipc", "1", "--out", out, "--vae", models["vae"]],
         "not an igds prior"),
    ]
    for argv, message in cases:
        with pytest.raises(IGDSInputError, match=message) as info:
            args = _parse(argv)
            args.handler(args)
        assert "\n" not in str(info.value), argv
    assert not os.path.exists(out)


def test_latent_settings_are_pixel_settings_of_the_folder(models, tmp_path):
    out = tmp_path / "out"
    distill(make_config(models, out, ipc=1))
    for overrides in ({"cfg_scale": 2.0}, {"cfg_channels": 4}, {"guide_from_step": 1}):
        setting = "guide_window" if "guide_from_step" in overrides else "latent"
        with pytest.raises(IGDSInputError, match=rf"another configuration: {setting}") as info:
            distill(make_config(models, out, ipc=1, **overrides))
        assert "\n" not in str(info.value)


def test_ddim_with_a_latent_prior_is_the_samplers_ddim_decoded(models, tmp_path):
    # DDIM through the CFG DiT and the VAE (latents never clipped; the learned variance half unread).
    out = tmp_path / "ddim"
    manifest = distill(make_config(models, out, ipc=1, sampler="ddim", eta=0.5))
    assert manifest["pixel_settings"]["sampler"] == "ddim" and manifest["pixel_settings"]["eta"] == 0.5
    prior = ClassifierFreeGuidance(load_dit(models["prior"], preset=None), 3.0, 3)
    sampler = Sampler(prior, DiffusionSchedule(ScheduleConfig("linear", 1000, str(STEPS), "large")), models["ve_model"],
                      GuidanceConfig(scale=2.0, beta=0.3, clip_x0=False), noise="torch", decoder=load_vae(models["vae"]),
                      prior_class_map=[imagenet_wnids().index(w) for w in WOOF], sampler="ddim", eta=0.5)
    images = sampler.sample([0, 1], [image_seed(5, WOOF[c], 0) for c in range(2)])
    for c, image in enumerate(images):
        np.testing.assert_array_equal(png_pixels(out / WOOF[c] / "00000.png"), to_uint8(image))
    ddpm = tmp_path / "ddpm"
    distill(make_config(models, ddpm, ipc=1))
    assert not np.array_equal(png_pixels(ddpm / WOOF[0] / "00000.png"), png_pixels(out / WOOF[0] / "00000.png"))
