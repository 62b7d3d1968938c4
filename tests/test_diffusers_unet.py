"""A diffusers UNet2DModel loaded from a local folder behaves like calling it directly."""
import json
import sys

import pytest
import torch

from factories import randomize_
from igds_fast.errors import IGDSInputError
from igds_fast.models.diffusers_unet import load_diffusers_unet


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")


def tiny_unet2d(diffusers, num_class_embeds=None, out_channels=6, sample_size=16):
    model = diffusers.UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=out_channels, layers_per_block=1,
        block_out_channels=(32, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, num_class_embeds=num_class_embeds,
    )
    return randomize_(model, 0.05).eval()


@pytest.mark.parametrize("classes", [None, 5])
def test_loaded_folder_matches_direct_call(diffusers, tmp_path, classes):
    model = tiny_unet2d(diffusers, classes)
    model.save_pretrained(tmp_path / "unet")
    prior = load_diffusers_unet(tmp_path / "unet")
    assert (prior.image_size, prior.in_channels, prior.out_channels) == (16, 3, 6)
    assert (prior.learn_sigma, prior.num_classes, prior.training) == (True, classes, False)
    x = torch.randn(2, 3, 16, 16)
    y = torch.tensor([0, 4]) if classes else None
    for t in (torch.tensor([10, 700]), torch.tensor([10.5, 699.25])):
        with torch.no_grad():
            expected = model(x, t, class_labels=y).sample
            got = prior(x, t, y)
        assert expected.abs().max() > 1e-2
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_bad_folders_and_inputs(diffusers, tmp_path):
    with pytest.raises(IGDSInputError, match="no config.json"):
        load_diffusers_unet(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(IGDSInputError, match="cannot load a UNet2DModel"):
        load_diffusers_unet(tmp_path)
    tiny_unet2d(diffusers, sample_size=None).save_pretrained(tmp_path / "unsized")
    with pytest.raises(IGDSInputError, match="needs a square sample_size, got None"):
        load_diffusers_unet(tmp_path / "unsized")

    tiny_unet2d(diffusers, None, out_channels=3).save_pretrained(tmp_path / "plain")
    prior = load_diffusers_unet(tmp_path / "plain")
    assert not prior.learn_sigma and prior.out_channels == 3
    with pytest.raises(IGDSInputError, match="labels given to an unconditional UNet"):
        prior(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(IGDSInputError, match=r"expects \[B, 3, 16, 16\] images, got \(1, 3, 8, 8\)"):
        prior(torch.randn(1, 3, 8, 8), torch.tensor([1]))


def test_missing_diffusers_is_one_line_install_hint(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(IGDSInputError, match="pip install diffusers") as info:
        load_diffusers_unet(tmp_path)
    assert "\n" not in str(info.value)


def test_sampler_runs_a_diffusers_prior(diffusers, tmp_path):
    from factories import tiny_ve
    from igds_fast.guidance import GuidanceConfig
    from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
    from igds_fast.sampling import Sampler

    tiny_unet2d(diffusers, 5).save_pretrained(tmp_path / "unet")
    prior = load_diffusers_unet(tmp_path / "unet")
    sampler = Sampler(prior, DiffusionSchedule(ScheduleConfig(sampling_steps="4")), tiny_ve(num_classes=5),
                      GuidanceConfig(scale=1.0, beta=0.2))
    images = sampler.sample([0, 4], [7, 8])
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all() and images.std() > 0.01


# ---- the scheduler config: the sampler's step against DDPMScheduler.step --------------------------
SCHEDULER_CASES = [
    # (prediction_type, variance_type, beta schedule settings, out_channels)
    ("epsilon", "fixed_small", dict(beta_schedule="linear", beta_start=0.0002, beta_end=0.03), 3),
    ("v_prediction", "fixed_small", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 3),
    ("v_prediction", "learned_range", dict(beta_schedule="squaredcos_cap_v2"), 6),
    ("sample", "fixed_large", dict(beta_schedule="linear"), 3),
]


def pipeline_root(diffusers, folder, prediction, variance, betas, out_channels, **scheduler):
    tiny_unet2d(diffusers, None, out_channels=out_channels).save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=50, prediction_type=prediction, variance_type=variance,
                            **betas, **scheduler).save_pretrained(folder / "scheduler")
    return folder


@pytest.mark.parametrize("prediction, variance, betas, out_channels", SCHEDULER_CASES)
def test_our_step_is_the_diffusers_schedulers_step(diffusers, tmp_path, monkeypatch, prediction, variance, betas,
                                                   out_channels):
    from factories import tiny_ve
    from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
    from igds_fast.guidance import GuidanceConfig
    from igds_fast.models.diffusers_unet import read_scheduler_config
    from igds_fast.sampling import Sampler
    from diffusers.schedulers import scheduling_ddpm

    root = pipeline_root(diffusers, tmp_path, prediction, variance, betas, out_channels)
    spec = read_scheduler_config(root)
    assert spec.prediction_type == prediction and spec.learned_range == (variance == "learned_range")
    prior = load_diffusers_unet(root, prediction_type=spec.prediction_type, schedule=spec.schedule)
    schedule = DiffusionSchedule(ScheduleConfig(**spec.schedule, sampling_steps="50"))  # every training step
    sampler = Sampler(prior, schedule, tiny_ve(num_classes=4), GuidanceConfig(scale=0.0, clip_x0=spec.clip_sample))
    scheduler = diffusers.DDPMScheduler.from_pretrained(root / "scheduler")
    x = torch.randn(2, 3, 16, 16)
    noise = torch.randn_like(x)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, **kwargs: noise.clone())
    for t in (49, 30, 5, 1):
        ours = sampler.step(x, t, torch.tensor([0, 1]), noise)
        with torch.no_grad():
            output = prior.model(x, torch.full((2,), t), return_dict=False)[0]
        theirs = scheduler.step(output, t, x).prev_sample
        # diffusers keeps its schedule in float32 (cumprod over 50 steps), ours is float64-computed
        torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("setting, message", [
    (dict(thresholding=True), "thresholding is not implemented"),
    (dict(variance_type="learned"), "variance_type 'learned'"),
    (dict(clip_sample_range=2.0), "clip_sample_range 2.0"),
    (dict(beta_schedule="sigmoid"), "beta_schedule 'sigmoid'"),
])
def test_a_scheduler_setting_the_sampler_lacks_is_refused_in_one_line(diffusers, tmp_path, setting, message):
    from igds_fast.models.diffusers_unet import read_scheduler_config

    settings = dict(prediction="epsilon", variance="fixed_small", betas={}, out_channels=3)
    if "variance_type" in setting:
        settings["variance"] = setting.pop("variance_type")
    if "beta_schedule" in setting:
        settings["betas"] = {"beta_schedule": setting.pop("beta_schedule")}
    root = pipeline_root(diffusers, tmp_path, settings["prediction"], settings["variance"], settings["betas"],
                         settings["out_channels"], **setting)
    with pytest.raises(IGDSInputError, match=message) as info:
        read_scheduler_config(root)
    assert "\n" not in str(info.value)


def test_distill_reads_a_pipeline_root(diffusers, tmp_path):
    from factories import tiny_ve
    from igds_fast.distill import distill, distill_config

    root = pipeline_root(diffusers, tmp_path / "pipe", "v_prediction", "fixed_small",
                         dict(beta_schedule="linear"), 3)
    ve = tiny_ve(num_classes=2)
    ve.class_names = ["a", "b"]
    ve.save(tmp_path / "ve.safetensors")
    ve = str(tmp_path / "ve.safetensors")
    common = dict(diffusers=str(root), steps=5, device="cpu", progress=False, prior_class_names=None)
    manifest = distill(distill_config(ve, str(tmp_path / "out"), 1, **common))
    settings = json.loads((tmp_path / "out" / ".igds_config.json").read_text())
    assert settings["prediction_type"] == "v_prediction" and settings["diffusion"]["beta_start"] == 0.0001
    assert len(manifest["images"]) == 2
    with pytest.raises(IGDSInputError, match="sets the noise schedule: drop --noise-schedule"):
        distill(distill_config(ve, str(tmp_path / "out2"), 1, noise_schedule="cosine", **common))
    pipeline_root(diffusers, tmp_path / "mismatch", "epsilon", "learned_range", {}, 3)
    with pytest.raises(IGDSInputError, match="does not fit a UNet with 3 output channels"):
        distill(distill_config(ve, str(tmp_path / "out3"), 1, **{**common, "diffusers": str(tmp_path / "mismatch")}))


# ---- where the scheduler config is: pipeline root, flat folder (google/ddpm-*), beside a unet folder ----
def test_the_scheduler_config_is_found_in_each_layout_and_ambiguity_is_refused(diffusers, tmp_path):
    from igds_fast.models.diffusers_unet import read_scheduler_config, scheduler_config_path, unet_folder

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=40, beta_start=0.0003, variance_type="fixed_large")
    root = pipeline_root(diffusers, tmp_path / "pipe", "epsilon", "fixed_small", dict(beta_schedule="linear"), 3)
    assert scheduler_config_path(root) == str(root / "scheduler" / "scheduler_config.json")
    assert scheduler_config_path(root / "unet") == str(root / "scheduler" / "scheduler_config.json")  # beside it

    flat = tmp_path / "flat"
    tiny_unet2d(diffusers, None, out_channels=3).save_pretrained(flat)
    assert scheduler_config_path(flat) is None
    assert read_scheduler_config(flat).schedule["diffusion_steps"] == 1000  # no config: guided-diffusion's defaults
    scheduler.save_pretrained(flat)  # save_pretrained writes scheduler_config.json into the folder itself
    assert unet_folder(flat) == str(flat) and scheduler_config_path(flat) == str(flat / "scheduler_config.json")
    spec = read_scheduler_config(flat)
    assert spec.schedule == {"noise_schedule": "linear", "diffusion_steps": 40, "fixed_variance": "large",
                             "beta_start": 0.0003, "beta_end": 0.02}
    assert spec.source == str(flat / "scheduler_config.json")

    scheduler.save_pretrained(flat / "scheduler")
    with pytest.raises(IGDSInputError, match="has two scheduler configs") as info:
        read_scheduler_config(flat)
    assert "\n" not in str(info.value)


def test_a_pre_0_1_scheduler_config_is_refused_not_read_with_defaults(tmp_path):
    from igds_fast.models.diffusers_unet import read_scheduler_config

    # An early revision of google/ddpm-cifar10-32 (diffusers 0.0.x): `timesteps`, no `num_train_timesteps`.
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "GaussianDDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
         "timesteps": 1000, "variance_type": "fixed_large"}))
    with pytest.raises(IGDSInputError, match="pre-0.1 diffusers scheduler config"):
        read_scheduler_config(tmp_path)
    (tmp_path / "scheduler_config.json").write_text("[1, 2]")
    with pytest.raises(IGDSInputError, match="is not a scheduler config"):
        read_scheduler_config(tmp_path)
