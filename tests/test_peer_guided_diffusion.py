"""guided-diffusion's own code (guided-diffusion-sdk: script_util, UNetModel, SpacedDiffusion) run as its
classifier_sample.py runs it, with IGDSConditioner in each documented route, against `igds-fast distill`
on the same weights and noise: within one uint8 level. The UNet is guided-diffusion's own UNetModel; our
CLI reads its weights from a prior file of ours (key for key the same state dict).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from factories import randomize_, tiny_ve
from igds_fast import IGDSGuidance, load_ve
from igds_fast import cli
from igds_fast.classes import imagenet_wnids
from igds_fast.diffusion import ScheduleConfig
from igds_fast.frontends import IGDSConditioner, label_map_from_class_map
from igds_fast.imageio import to_uint8
from igds_fast.models.adm import ADMUNet
from igds_fast.models.priors import save_prior
from igds_fast.seeding import INITIAL_NOISE_STREAM, seeded_normal

script_util = pytest.importorskip("guided_diffusion.script_util")
gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10
SCALE, BETA = 3.0, 0.4
IMAGENET_CLASSES = [3, 17, 250, 999]  # the VE's classes, as ImageNet indices
MODEL_FLAGS = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                   learn_sigma=True, class_cond=True, use_scale_shift_norm=True, resblock_updown=True, num_heads=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """guided-diffusion's model and diffusion (classifier_sample.py's create_model_and_diffusion), its
    random weights saved as our prior file, and a VE over four ImageNet classes."""
    folder = tmp_path_factory.mktemp("guided_diffusion")
    options = {**script_util.model_and_diffusion_defaults(), **MODEL_FLAGS, "noise_schedule": "linear",
               "timestep_respacing": str(STEPS)}
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model, _ = script_util.create_model_and_diffusion(**options)
        randomize_(model, 0.05)
        ve = tiny_ve(num_classes=len(IMAGENET_CLASSES), channels=3, resolution=16)
    ours = ADMUNet.from_flags(**MODEL_FLAGS)
    ours.load_state_dict(model.state_dict())  # key for key the same network
    prior = str(folder / "prior.safetensors")
    save_prior(prior, ours, MODEL_FLAGS, ScheduleConfig(noise_schedule="linear", diffusion_steps=1000,
                                                       sampling_steps="1000"), imagenet_wnids())
    wnids = imagenet_wnids()
    ve.class_names = [wnids[c] for c in IMAGENET_CLASSES]
    ve.save(folder / "ve.safetensors")
    return {"prior": prior, "ve": str(folder / "ve.safetensors"), "model": model.eval(), "options": options}


def run_cli(files, out, *extra) -> tuple[dict, np.ndarray]:
    argv = ["distill", "--prior", files["prior"], "--ve", files["ve"], "--ipc", "1", "--steps", str(STEPS),
            "--composite", "1", "--seed", "7", "--device", "cpu", "--quiet", "--out", str(out), *extra]
    assert cli.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    images = []
    for entry in manifest["images"]:
        with Image.open(os.path.join(out, entry["path"])) as image:
            images.append(np.asarray(image.convert("RGB")))
    return manifest, np.stack(images)


def classifier_sample(files, monkeypatch, manifest, route: str, mode: str, scale: float = SCALE) -> np.ndarray:
    """classifier_sample.py's loop (model_fn, p_sample_loop, clip_denoised=True) with the conditioner."""
    model = files["model"]
    _, diffusion = script_util.create_model_and_diffusion(**files["options"])

    def model_fn(x, t, y=None):  # classifier_sample.py's
        return model(x, t, y)

    guidance = IGDSGuidance(load_ve(files["ve"]), beta=BETA)
    conditioner = IGDSConditioner(guidance, scale=scale, mode=mode,
                                  label_map=label_map_from_class_map(IMAGENET_CLASSES, 1000))
    if route == "patch":
        conditioner.patch(diffusion, model_fn)
    else:
        conditioner.bind(model_fn, diffusion)
    seeds = [entry["seeds"][0] for entry in manifest["images"]]
    shape = (3, 16, 16)
    queue = [seeded_normal(seeds, i, shape, "cpu") for i in reversed(range(STEPS))]
    monkeypatch.setattr(gd.th, "randn_like", lambda x: queue.pop(0).clone())
    y = torch.tensor([entry["prior_label"] for entry in manifest["images"]])
    sample = diffusion.p_sample_loop(model_fn, (len(seeds), *shape), noise=seeded_normal(seeds, INITIAL_NOISE_STREAM,
                                                                                         shape, "cpu"),
                                     clip_denoised=True, model_kwargs={"y": y}, cond_fn=conditioner.cond_fn,
                                     device="cpu")
    assert queue == []
    return to_uint8(sample.clamp(-1, 1))


@pytest.mark.parametrize("mode", ["x0", "xt"])
@pytest.mark.parametrize("route", ["patch", "bind"])
def test_each_route_equals_our_cli(files, tmp_path, monkeypatch, route, mode):
    manifest, ours = run_cli(files, tmp_path / "ours", "--scale", str(SCALE), "--beta", str(BETA), "--mode", mode)
    theirs = classifier_sample(files, monkeypatch, manifest, route, mode)
    assert int(np.abs(ours.astype(int) - theirs.astype(int)).max()) <= 1
    _, plain = run_cli(files, tmp_path / "plain", "--scale", "0")
    assert int(np.abs(plain.astype(int) - ours.astype(int)).max()) > 5  # the guidance moved the images


def test_scale_0_is_the_unguided_loop_bit_for_bit(files, tmp_path, monkeypatch):
    manifest, ours = run_cli(files, tmp_path / "ours", "--scale", "0")
    for route in ("patch", "bind"):
        assert np.array_equal(classifier_sample(files, monkeypatch, manifest, route, "x0", scale=0.0), ours)


@pytest.mark.parametrize("route", ["patch", "bind"])
def test_unguided_steps_do_no_gradient_work(files, route):
    """Scale 0, and the steps outside a window, cost what the loop costs: no guidance call, and in the
    bind route (which predicts x0 itself) no UNet forward beyond the loop's own."""
    model = files["model"]
    forwards, calls = [], []

    def model_fn(x, t, y=None):
        forwards.append(int(t[0]))
        return model(x, t, y)

    guidance = IGDSGuidance(load_ve(files["ve"]), beta=BETA)
    original_call = type(guidance).__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original_call(self, *args, **kwargs)

    y = torch.tensor([IMAGENET_CLASSES[0], IMAGENET_CLASSES[2]])
    for scale, window, guided in ((0.0, None, 0), (SCALE, (3, 5), 3)):
        _, diffusion = script_util.create_model_and_diffusion(**files["options"])
        conditioner = IGDSConditioner(guidance, scale=scale, window=window,
                                      label_map=label_map_from_class_map(IMAGENET_CLASSES, 1000))
        if route == "patch":
            conditioner.patch(diffusion, model_fn)
        else:
            conditioner.bind(model_fn, diffusion)
        forwards.clear()
        calls.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(guidance), "__call__", counted)
            diffusion.p_sample_loop(model_fn, (2, 3, 16, 16), clip_denoised=True, model_kwargs={"y": y},
                                    cond_fn=conditioner.cond_fn, device="cpu")
        assert len(calls) == guided
        assert len(forwards) == STEPS + (guided if route == "bind" else 0)


def test_an_x0_that_is_not_the_loops_own_is_refused(files, monkeypatch, tmp_path):
    """Mode xt recomputes x0 with autograd: with another clip_denoised than the loop's, it is another
    x0 than the one the loop steps from, and the conditioner says so in one line instead of guiding it."""
    from igds_fast.errors import IGDSInputError

    model = files["model"]
    _, diffusion = script_util.create_model_and_diffusion(**files["options"])

    def model_fn(x, t, y=None):
        return model(x, t, y)

    conditioner = IGDSConditioner(IGDSGuidance(load_ve(files["ve"]), beta=BETA), scale=SCALE, mode="xt",
                                  clip_denoised=False, label_map=label_map_from_class_map(IMAGENET_CLASSES, 1000))
    conditioner.patch(diffusion, model_fn)
    y = torch.tensor([IMAGENET_CLASSES[1], IMAGENET_CLASSES[3]])
    with pytest.raises(IGDSInputError, match="differs from the loop's own pred_xstart") as info:
        diffusion.p_sample_loop(model_fn, (2, 3, 16, 16), clip_denoised=True, model_kwargs={"y": y},
                                cond_fn=conditioner.cond_fn, device="cpu")
    assert "\n" not in str(info.value)
