"""CIFAR-10 (the paper's Table 5): an unconditional 32-px DDPM in the flat layout of google/ddpm-cifar10-32.

That public folder holds config.json (a UNet2DModel: 3 -> 3 channels, sample_size 32, no class
embeddings), the weights and scheduler_config.json (DDPMScheduler: 1000 linear betas 1e-4 .. 0.02,
fixed_large variance, clip_sample) side by side. Here a tiny random UNet2DModel is saved in that
layout; `--prior DIR` (or `--diffusers DIR`) samples it, `--classes cifar10` picks the VE's classes,
and the VE alone supplies the class guidance (the prior is unconditional).
"""
import json
import os

import pytest
import torch

from factories import randomize_, tiny_ve
from igds_fast.classes import class_list
from igds_fast.errors import IGDSInputError

CIFAR10 = class_list("cifar10")
# scheduler_config.json of google/ddpm-cifar10-32 (main): DDPMScheduler's defaults but fixed_large.
DDPM_CIFAR10_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                              variance_type="fixed_large", clip_sample=True)


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")


def ddpm_cifar10_folder(diffusers, folder):
    """A tiny random UNet2DModel + scheduler in google/ddpm-cifar10-32's flat layout."""
    unet = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6,
    )
    randomize_(unet, 0.05).eval().save_pretrained(folder)
    diffusers.DDPMScheduler(**DDPM_CIFAR10_SCHEDULER).save_pretrained(folder)  # flat: folder/scheduler_config.json
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                         "scheduler": ["diffusers", "DDPMScheduler"],
                                                         "unet": ["diffusers", "UNet2DModel"]}))
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors", "model_index.json",
                                          "scheduler_config.json"]
    return folder, unet


def test_the_flat_folder_is_described_and_loaded_as_the_model_it_is(diffusers, tmp_path):
    from igds_fast.models.priors import describe_prior, load_prior_unet

    folder, unet = ddpm_cifar10_folder(diffusers, tmp_path / "ddpm-cifar10-32")
    spec = describe_prior(str(folder), None, None, CIFAR10)
    assert (spec.kind, spec.path, spec.class_names, spec.prediction_type, spec.clip_x0) == (
        "diffusers", str(folder), None, "epsilon", True)
    assert spec.schedule == {"noise_schedule": "linear", "diffusion_steps": 1000, "fixed_variance": "large",
                             "beta_start": 0.0001, "beta_end": 0.02}
    assert "scheduler_config.json" in spec.fingerprint and "diffusion_pytorch_model.safetensors" in spec.fingerprint
    assert describe_prior(None, None, str(folder), CIFAR10) == spec  # --prior DIR is --diffusers DIR
    prior = load_prior_unet(spec, "cpu")
    assert (prior.image_size, prior.in_channels, prior.num_classes, prior.learn_sigma) == (32, 3, None, False)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([999, 3])
    with torch.no_grad():
        expected = unet(x, t).sample
        torch.testing.assert_close(prior(x, t), expected, rtol=0, atol=0)
    assert expected.abs().max() > 1e-2


def test_our_step_is_ddpm_schedulers_step_on_the_cifar10_schedule(diffusers, tmp_path, monkeypatch):
    """fixed_large variance, eps prediction, clipped x0, 1000 linear betas: DDPMScheduler.step at full length."""
    from diffusers.schedulers import scheduling_ddpm

    from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
    from igds_fast.guidance import GuidanceConfig
    from igds_fast.models.priors import describe_prior, load_prior_unet
    from igds_fast.sampling import Sampler

    folder, _ = ddpm_cifar10_folder(diffusers, tmp_path / "ddpm-cifar10-32")
    spec = describe_prior(str(folder), None, None, CIFAR10)
    prior = load_prior_unet(spec, "cpu")
    schedule = DiffusionSchedule(ScheduleConfig(**spec.schedule, sampling_steps="1000"))  # every training step
    ve = tiny_ve(num_classes=10, resolution=16)
    sampler = Sampler(prior, schedule, ve, GuidanceConfig(scale=0.0, clip_x0=spec.clip_x0))
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder)
    scheduler.set_timesteps(1000)
    x = torch.randn(2, 3, 32, 32)
    noise = torch.randn_like(x)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, **kwargs: noise.clone())
    for t in (999, 500, 20, 1):
        ours = sampler.step(x, t, torch.tensor([0, 1]), noise)
        with torch.no_grad():
            output = prior.model(x, torch.full((2,), t), return_dict=False)[0]
        theirs = scheduler.step(output, t, x).prev_sample
        # diffusers keeps its schedule in float32 (a cumprod over 1000 steps); ours is float64-computed.
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _cli(argv):
    from igds_fast import cli

    args = cli.parse(["distill", *argv])
    return args.handler(args)


def test_distill_cifar10_from_the_flat_folder_two_steps(diffusers, tmp_path):
    """The README's CIFAR-10 recipe at IPC 1 and 2 steps: --prior DIR and --diffusers DIR give the same bytes."""
    from PIL import Image

    folder, _ = ddpm_cifar10_folder(diffusers, tmp_path / "models" / "ddpm-cifar10-32")
    ve = tiny_ve(num_classes=10, resolution=16)
    ve.class_names = list(CIFAR10)
    ve.save(tmp_path / "ve_cifar10.safetensors")
    common = ["--ve", str(tmp_path / "ve_cifar10.safetensors"), "--classes", "cifar10", "--ipc", "1", "--steps", "2",
              "--beta", "0.1", "--device", "cpu", "--quiet"]
    assert _cli(["--prior", str(folder), "--out", str(tmp_path / "a"), *common]) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["prior"] == {"kind": "diffusers", "path": str(folder), "preset": None, "variance": "fixed_large",
                                 "conditional": False, "num_classes": None}
    assert manifest["pixel_settings"]["diffusion"]["fixed_variance"] == "large"
    assert manifest["pixel_settings"]["classes"] == CIFAR10 and manifest["settings"]["job"]["composite"] == 1
    assert [image["prior_label"] for image in manifest["images"]] == [None] * 10
    assert [image["label"] for image in manifest["images"]] == list(range(10))
    for name in CIFAR10:
        with Image.open(tmp_path / "a" / name / "00000.png") as image:
            assert image.size == (32, 32)
    assert _cli(["--diffusers", str(folder), "--out", str(tmp_path / "b"), *common]) == 0
    for name in CIFAR10:
        assert (tmp_path / "a" / name / "00000.png").read_bytes() == (tmp_path / "b" / name / "00000.png").read_bytes()


def test_flags_that_do_not_apply_to_a_folder_prior_are_refused(diffusers, tmp_path):
    from igds_fast.models.priors import describe_prior

    folder, _ = ddpm_cifar10_folder(diffusers, tmp_path / "ddpm-cifar10-32")
    cases = [
        (dict(preset="adm64-cond"), "--arch applies to checkpoint files, not to diffusers folders"),
        (dict(prior_kind="adm"), "--prior-kind applies to checkpoint files"),
        (dict(noise_schedule="cosine"), "scheduler_config.json sets the noise schedule: drop --noise-schedule"),
    ]
    for options, message in cases:
        with pytest.raises(IGDSInputError, match=message):
            describe_prior(str(folder), options.get("preset"), None, CIFAR10, options.get("noise_schedule"),
                           prior_kind=options.get("prior_kind"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(IGDSInputError, match="not a diffusers UNet folder or pipeline root"):
        describe_prior(str(tmp_path / "empty"), None, None, CIFAR10)
    # --noise-schedule only means something for a diffusers folder without a scheduler config.
    (tmp_path / "prior.pt").write_bytes(b"x")
    with pytest.raises(IGDSInputError, match="--noise-schedule applies to diffusers folders only"):
        describe_prior(str(tmp_path / "prior.pt"), "adm64-cond", None, CIFAR10, "cosine")
