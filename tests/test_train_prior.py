"""Prior training: the hybrid loss equals guided-diffusion's, training learns, the artifact round-trips."""
import dataclasses

import pytest
import torch

from factories import randomize_
from igds_fast.diffusion import DiffusionSchedule
from igds_fast.errors import IGDSInputError
from igds_fast.models.priors import is_prior_file, load_prior, read_prior_header, save_prior
from igds_fast.train_prior import PriorTrainConfig, diffusion_losses, train_prior

gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = PriorTrainConfig(steps=2, batch_size=8, warmup_steps=1, noise_schedule="linear")


def _tiny_unet(config: PriorTrainConfig, classes=3):
    from igds_fast.models.adm import ADMUNet

    unet = ADMUNet.from_flags(**config.unet_flags(8, 1, classes))
    return randomize_(unet, 0.05).eval()


def _reference(config: PriorTrainConfig):
    return gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule(config.noise_schedule, config.diffusion_steps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE if config.learn_sigma else gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.RESCALED_MSE if config.learn_sigma else gd.LossType.MSE,
    )


class _Float64Model(torch.nn.Module):
    """A smooth float64 stand-in for the UNet (the loss formulas are under test, not the network).

    ADMUNet's GroupNorm runs in float32 whatever the weights, which would blur a float64 comparison.
    """

    def __init__(self, learn_sigma: bool, classes: int = 3):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.conv = torch.nn.Conv2d(1, 2 if learn_sigma else 1, 3, padding=1).double()
        self.label_scale = torch.nn.Parameter(torch.rand(classes, dtype=torch.float64) + 0.5)

    def forward(self, x, t, y):
        out = self.conv(x) * self.label_scale[y][:, None, None, None] + torch.cos(t.double() / 300)[:, None, None, None]
        if self.learn_sigma:  # v must stay in the learned range [-1, 1]
            out = torch.cat([out[:, :1], torch.tanh(out[:, 1:])], dim=1)
        return out


def _extract_float64(arr, timesteps, broadcast_shape):
    """guided-diffusion's _extract_into_tensor without its cast to float32."""
    values = torch.from_numpy(arr)[timesteps.cpu()]
    while values.dim() < len(broadcast_shape):
        values = values[..., None]
    return values.expand(broadcast_shape)


@pytest.mark.parametrize("noise_schedule", ["linear", "cosine"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_losses_equal_guided_diffusion_training_losses(rng_seed, monkeypatch, noise_schedule, learn_sigma):
    config = dataclasses.replace(TINY, noise_schedule=noise_schedule, learn_sigma=learn_sigma)
    model = _Float64Model(learn_sigma)
    # t = 0 (decoder NLL branch), small, middle and last timesteps in one batch; pixels on the
    # 8-bit grid with some at the -1 / 1 edges (the decoder's open-ended bins).
    t = torch.tensor([0, 1, 7, 500, 998, 999])
    x0 = torch.randint(0, 256, (6, 1, 8, 8)).double() / 127.5 - 1.0
    x0[:, :, 0, 0], x0[:, :, 0, 1] = -1.0, 1.0
    noise = torch.randn_like(x0)
    y = torch.randint(0, 3, (6,))
    monkeypatch.setattr(gd, "_extract_into_tensor", _extract_float64)
    schedule = DiffusionSchedule(config.schedule_config(), dtype=torch.float64)
    with torch.no_grad():
        ours = diffusion_losses(model, schedule, x0, t, noise, y)
        reference = _reference(config).training_losses(
            lambda x, ts, **kw: model(x, ts, kw["y"]), x0, t, model_kwargs={"y": y}, noise=noise
        )
    torch.testing.assert_close(ours["mse"], reference["mse"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours["loss"], reference["loss"], rtol=1e-9, atol=1e-11)
    assert ours["mse"].min() > 0
    if learn_sigma:
        torch.testing.assert_close(ours["vb"], reference["vb"], rtol=1e-9, atol=1e-11)
        assert ours["vb"].abs().min() > 0  # every row, t = 0 included, has a real VB term
    else:
        assert "vb" not in ours


def test_vb_term_trains_only_the_variance(rng_seed):
    unet = _tiny_unet(TINY)
    schedule = DiffusionSchedule(TINY.schedule_config())
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    losses = diffusion_losses(unet, schedule, x0, torch.tensor([3, 100, 600, 900]), torch.randn_like(x0),
                              torch.tensor([0, 1, 2, 0]))
    output_weight = unet.out[2].weight  # conv to [eps (1 channel), v (1 channel)]
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), output_weight, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output_weight)
    assert grad_vb[0].abs().max() == 0 and grad_vb[1].abs().max() > 0  # eps row untouched by VB
    assert grad_mse[0].abs().max() > 0 and grad_mse[1].abs().max() == 0


def _toy_data(count=48, classes=3):
    """Class c: a bright horizontal bar at row 2c on a dark 8x8 image, with pixel noise."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(count) % classes
    images = torch.full((count, 1, 8, 8), -0.8)
    for i, label in enumerate(labels.tolist()):
        images[i, 0, 2 * label : 2 * label + 2] = 0.8
    images += 0.05 * torch.randn(images.shape, generator=generator)
    return images.clamp(-1, 1), labels


def test_training_reduces_the_loss_and_is_seeded(tmp_path):
    images, labels = _toy_data()
    config = PriorTrainConfig(steps=30, batch_size=16, lr=2e-3, warmup_steps=5, ema_decay=0.9, seed=7)
    unet, schedule_config, report = train_prior(images, labels, ["a", "b", "c"], config, log_every=10)
    first, last = report.loss_curve[0][1], report.loss_curve[-1][1]
    assert last < 0.7 * first, report.loss_curve
    assert report.steps == 30 and report.samples_per_s > 0
    assert schedule_config.noise_schedule == "cosine" and schedule_config.diffusion_steps == 1000
    again, _, _ = train_prior(images, labels, ["a", "b", "c"], config, log_every=10)
    for (name, a), b in zip(unet.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    other, _, _ = train_prior(images, labels, ["a", "b", "c"], dataclasses.replace(config, seed=8), log_every=10)
    assert not torch.equal(unet.out[2].weight, other.out[2].weight)


def test_saved_prior_round_trips(tmp_path):
    config = TINY
    unet = _tiny_unet(config)
    path = tmp_path / "prior.safetensors"
    flags = config.unet_flags(8, 1, 3)
    save_prior(path, unet, flags, config.schedule_config(), ["x", "y", "z"], {"note": "test"})
    loaded, schedule_config, names = load_prior(path)
    assert names == ["x", "y", "z"]
    assert schedule_config.noise_schedule == "linear" and schedule_config.fixed_variance == "small"
    assert (loaded.image_size, loaded.in_channels, loaded.num_classes, loaded.learn_sigma) == (8, 1, 3, True)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 700]), torch.tensor([2, 0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), unet(x, t, y), rtol=0, atol=0)
    assert read_prior_header(path)["training"] == {"note": "test"}
    assert is_prior_file(path)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file


def test_bad_input_is_one_line(tmp_path):
    images, labels = _toy_data()
    cases = [
        (lambda: PriorTrainConfig(steps=0), "steps must be a positive integer"),
        (lambda: PriorTrainConfig(num_channels=48), "multiple of 32"),
        (lambda: PriorTrainConfig(noise_schedule="sqrt"), "unknown noise schedule"),
        (lambda: train_prior(images * 3, labels, ["a", "b", "c"], TINY), r"\[-1, 1\]"),
        (lambda: train_prior(images, labels + 5, ["a", "b", "c"], TINY), "labels must lie"),
        (lambda: train_prior(images[:, :, :, :6], labels, ["a", "b", "c"], TINY), "square"),
        (lambda: load_prior(tmp_path / "missing.safetensors"), "not found"),
    ]
    not_a_prior = tmp_path / "x.safetensors"
    not_a_prior.write_bytes(b"garbage")
    cases.append((lambda: load_prior(not_a_prior), "not a readable safetensors"))
    for call, message in cases:
        with pytest.raises(IGDSInputError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_command_line_trains_and_saves_a_prior_distill_can_read(tmp_path, capsys):
    import argparse

    from PIL import Image

    from igds_fast.cli.train_prior import add_parser as add_train_prior_parser, run as run_train_prior

    rng = torch.Generator().manual_seed(3)
    for name in ("ant", "bee"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(8, 8, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    parser = argparse.ArgumentParser()
    add_train_prior_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "prior.safetensors"
    args = parser.parse_args(["train-prior", "--data", str(tmp_path / "data"), "--out", str(out), "--image-size", "8",
                              "--steps", "3", "--batch-size", "4", "--device", "cpu"])
    assert run_train_prior(args) == 0
    assert "3 steps" in capsys.readouterr().out
    unet, schedule_config, names = load_prior(out)
    assert names == ["ant", "bee"] and unet.in_channels == 3 and unet.num_classes == 2
    assert read_prior_header(out)["training"]["config"]["steps"] == 3
    bad = parser.parse_args(["train-prior", "--digits", "--out", str(tmp_path / "missing" / "p.safetensors")])
    with pytest.raises(IGDSInputError, match="does not exist"):
        run_train_prior(bad)
    rgb_digits = parser.parse_args(["train-prior", "--digits", "--channels", "3", "--out", str(tmp_path / "p.safetensors")])
    with pytest.raises(IGDSInputError, match="--channels 3 applies to --data"):  # it would train grayscale anyway
        run_train_prior(rgb_digits)
