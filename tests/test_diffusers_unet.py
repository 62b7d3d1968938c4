"""A diffusers UNet2DModel loaded from a local folder behaves like calling it directly."""
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
