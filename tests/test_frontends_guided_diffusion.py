"""IGDSConditioner against the original guided-diffusion code: its own p_sample / p_sample_loop with the
adapter equal Sampler.step / Sampler.sample fed the same noise (x0 and xt modes, learned sigma,
respaced to 20 steps of 1000), within 1e-5 in float32.
"""
from __future__ import annotations

import os

import pytest
import torch

from factories import tiny_adm, tiny_ve
from tolerances import tolerance
from igds_fast import DiffusionSchedule, GuidanceConfig, Sampler, ScheduleConfig
from igds_fast.errors import IGDSInputError
from igds_fast.frontends import IGDSConditioner, label_map_from_class_map
from igds_fast.seeding import INITIAL_NOISE_STREAM

gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
respace = pytest.importorskip("guided_diffusion.respace")

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = "20"
PRIOR_MAP = [3, 17, 250, 999]  # VE class -> ImageNet class of the prior
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def spaced_diffusion():
    return respace.SpacedDiffusion(
        use_timesteps=respace.space_timesteps(1000, STEPS), betas=gd.get_named_beta_schedule("linear", 1000),
        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.MSE, rescale_timesteps=False,
    )


@pytest.fixture(scope="module")
def parts():
    with torch.random.fork_rng():
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        return tiny_adm(image_size=16), tiny_ve(num_classes=4, resolution=24)


def ours(parts, mode, **guidance):
    unet, ve = parts
    config = GuidanceConfig(scale=2.5, beta=0.6, tau=0.9, mode=mode, **guidance)
    return Sampler(unet, DiffusionSchedule(ScheduleConfig("linear", 1000, STEPS)), ve, config, prior_class_map=PRIOR_MAP)


def conditioner_for(sampler, mode, clip_denoised=True):
    return IGDSConditioner(sampler.guidance_fn, scale=sampler.guidance.scale,
                           label_map=label_map_from_class_map(PRIOR_MAP, 1000), mode=mode, clip_denoised=clip_denoised)


def inject(monkeypatch, noises):
    """guided-diffusion's th.randn_like (torch.randn_like itself) returns these tensors, in order."""
    queue = list(noises)
    monkeypatch.setattr(gd.th, "randn_like", lambda x: queue.pop(0).clone())
    return queue


@pytest.mark.parametrize("mode", ["x0", "xt"])
@pytest.mark.parametrize("route", ["patch", "bind"])
@pytest.mark.parametrize("i", [1, 13])
def test_p_sample_with_the_conditioner_equals_our_step(parts, monkeypatch, mode, route, i):
    unet, _ = parts
    sampler = ours(parts, mode)
    x = torch.randn(3, 3, 16, 16)
    labels = torch.tensor([2, 0, 3])
    noise = torch.randn_like(x)
    expected = sampler.step(x, i, labels, noise)

    diffusion = spaced_diffusion()
    conditioner = conditioner_for(sampler, mode)
    if route == "patch":
        conditioner.patch(diffusion, unet)  # condition_mean at the diffusion's own pred_xstart
    else:
        conditioner.bind(unet, diffusion)  # an unpatched diffusion: cond_fn predicts x0 itself
    inject(monkeypatch, [noise])
    with torch.no_grad():
        actual = diffusion.p_sample(unet, x, torch.full((3,), i), cond_fn=conditioner.cond_fn,
                                    model_kwargs={"y": torch.tensor(PRIOR_MAP)[labels]})["sample"]
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    unguided = ours(parts, mode, guide_from_step=100).step(x, i, labels, noise)
    assert (expected - unguided).abs().max() > 1e-4  # the guidance really moved the sample


@pytest.mark.parametrize("mode", ["x0", "xt"])
def test_p_sample_loop_with_the_conditioner_equals_our_sample(parts, monkeypatch, mode):
    unet, _ = parts
    sampler = ours(parts, mode)
    labels, seeds = torch.tensor([1, 3]), [101, 202]
    shape = (3, 16, 16)
    x_T = sampler.noise_source(seeds, INITIAL_NOISE_STREAM, shape, "cpu")
    # The per-step noise Sampler.sample draws, in p_sample_loop's order (i = N-1 .. 0; the last is masked).
    noises = [sampler.noise_source(seeds, i, shape, "cpu") for i in reversed(range(int(STEPS)))]
    diffusion = conditioner_for(sampler, mode).patch(spaced_diffusion(), unet)
    left = inject(monkeypatch, noises)
    loop = dict(noise=x_T, clip_denoised=True, cond_fn=lambda *a, **k: None,
                model_kwargs={"y": torch.tensor(PRIOR_MAP)[labels]})
    trajectory = tolerance(torch.float32, "trajectory")
    if mode == "x0":
        # The whole loop, free-running: per-step rounding passes through UNet and encoder every step.
        final = diffusion.p_sample_loop(unet, (2, *shape), **loop)
        torch.testing.assert_close(final.clamp(-1, 1), sampler.sample(labels, seeds), **trajectory)
    else:
        # Mode xt differentiates x0 = clip(...) w.r.t. x_t: the clip's derivative jumps at +-1, so a
        # free-running loop takes another branch wherever a 1-ulp difference straddles it (seen: 6 of
        # 1536 values off by 1.6e-3 after 20 steps). Every step of guided-diffusion's own loop is
        # compared instead with our step from the same x_t and noise.
        x = x_T
        steps = zip(reversed(range(int(STEPS))), diffusion.p_sample_loop_progressive(unet, (2, *shape), **loop))
        for k, (i, out) in enumerate(steps):
            expected = sampler.step(x, i, labels, noise=noises[k] if i > 0 else None)
            torch.testing.assert_close(out["sample"], expected, **trajectory)
            x = out["sample"]
    assert left == []


def test_the_with_grad_route_of_forks(parts, monkeypatch):
    # guided-diffusion-sdk (IGD-style forks) computes p_mean_var with autograd on and passes it.
    unet, _ = parts
    if not hasattr(gd.GaussianDiffusion, "p_sample_with_grad"):
        pytest.skip("this guided-diffusion has no p_sample_with_grad")
    for mode in ("x0", "xt"):
        sampler = ours(parts, mode)
        x, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
        noise = torch.randn(2, 3, 16, 16)  # (randn_like is the patched one after the first round)
        expected = sampler.step(x, 7, labels, noise)
        diffusion = spaced_diffusion()
        inject(monkeypatch, [noise])
        with torch.no_grad():
            actual = diffusion.p_sample_with_grad(unet, x, torch.full((2,), 7), cond_fn=conditioner_for(sampler, mode)
                                                  .cond_fn_with_grad, model_kwargs={"y": torch.tensor(PRIOR_MAP)[labels]})
        torch.testing.assert_close(actual["sample"], expected, **TOLERANCE)


def test_bad_use_is_a_one_line_error(parts):
    sampler = ours(parts, "x0")
    conditioner = conditioner_for(sampler, "x0")
    with pytest.raises(IGDSInputError, match="call bind"):
        conditioner.cond_fn(torch.randn(1, 3, 16, 16), torch.tensor([10]), y=torch.tensor([3]))
    with pytest.raises(IGDSInputError, match="pass the model"):
        conditioner_for(sampler, "xt").patch(spaced_diffusion())
    diffusion = conditioner.patch(spaced_diffusion())
    out = {"pred_xstart": torch.zeros(1, 3, 16, 16), "mean": torch.zeros(1, 3, 16, 16), "variance": torch.ones(1)}
    with pytest.raises(IGDSInputError, match=r"prior classes \[5\] are not VE classes"):
        diffusion.condition_mean(None, out, out["mean"], torch.tensor([3]), {"y": torch.tensor([5])})
    with pytest.raises(IGDSInputError, match="needs set_labels"):
        diffusion.condition_mean(None, out, out["mean"], torch.tensor([3]), {})
    conditioner.set_labels([1])  # an unconditional prior: the VE labels given
    assert torch.isfinite(diffusion.condition_mean(None, out, out["mean"], torch.tensor([3]), {})).all()
    IGDSConditioner.unpatch(diffusion)
    assert "condition_mean" not in vars(diffusion)
