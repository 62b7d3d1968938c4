"""Our DDIM step against guided-diffusion's own `ddim_sample` / `ddim_sample_loop` with IGDSConditioner.

guided-diffusion guides DDIM through `condition_score` (eps shifted by -sqrt(1 - abar) * cond_fn);
`Sampler(..., sampler="ddim", eta=...)` must take the same step from the same x_t and noise, within
1e-5 in float32: x0 and xt modes, a learned-sigma prior (DDIM ignores its variance half), respaced to
20 of 1000 steps, both routes (patch: condition_score at the loop's own pred_xstart; bind: the
cond_fn route of an unpatched diffusion). Then the free-running loop at the trajectory tolerance, the
guided window, scale 0 and the with-grad forks. Each test prints its max error (-s shows it).
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


def spaced_diffusion(schedule="linear"):
    return respace.SpacedDiffusion(
        use_timesteps=respace.space_timesteps(1000, STEPS), betas=gd.get_named_beta_schedule(schedule, 1000),
        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.MSE, rescale_timesteps=False,
    )


@pytest.fixture(scope="module")
def parts():
    with torch.random.fork_rng():
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        return tiny_adm(image_size=16), tiny_ve(num_classes=4, resolution=24)


def ours(parts, mode, eta, schedule="linear", **guidance):
    unet, ve = parts
    config = GuidanceConfig(scale=2.5, beta=0.6, tau=0.9, mode=mode, **guidance)
    return Sampler(unet, DiffusionSchedule(ScheduleConfig(schedule, 1000, STEPS)), ve, config,
                   prior_class_map=PRIOR_MAP, sampler="ddim", eta=eta)


def conditioner_for(sampler, mode, **kwargs):
    return IGDSConditioner(sampler.guidance_fn, scale=sampler.guidance.scale,
                           label_map=label_map_from_class_map(PRIOR_MAP, 1000), mode=mode, **kwargs)


def inject(monkeypatch, noises):
    """guided-diffusion's th.randn_like returns these tensors, in order (ddim_sample draws one every step)."""
    queue = list(noises)
    monkeypatch.setattr(gd.th, "randn_like", lambda x: queue.pop(0).clone())
    return queue


def max_error(actual, expected) -> float:
    return float((actual - expected).abs().max())


@pytest.mark.parametrize("mode", ["x0", "xt"])
@pytest.mark.parametrize("route", ["patch", "bind"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_sample_with_the_conditioner_equals_our_step(parts, monkeypatch, mode, route, eta, schedule):
    unet, _ = parts
    sampler = ours(parts, mode, eta, schedule)
    x = torch.randn(3, 3, 16, 16)
    labels = torch.tensor([2, 0, 3])
    errors = []
    for i in (int(STEPS) - 1, 13, 1, 0):
        noise = torch.randn(x.shape)  # not randn_like: inject() replaces torch's own (gd.th is torch)
        expected = sampler.step(x, i, labels, noise)
        diffusion = spaced_diffusion(schedule)
        conditioner = conditioner_for(sampler, mode)
        if route == "patch":
            conditioner.patch(diffusion, unet)  # condition_score at the diffusion's own pred_xstart
        else:
            conditioner.bind(unet, diffusion)  # an unpatched diffusion: its condition_score calls cond_fn
        inject(monkeypatch, [noise])
        with torch.no_grad():
            actual = diffusion.ddim_sample(unet, x, torch.full((3,), i), cond_fn=conditioner.cond_fn,
                                           model_kwargs={"y": torch.tensor(PRIOR_MAP)[labels]}, eta=eta)["sample"]
        torch.testing.assert_close(actual, expected, **TOLERANCE)
        errors.append(max_error(actual, expected))
        if i == 13:
            unguided = ours(parts, mode, eta, schedule, guide_from_step=100).step(x, i, labels, noise)
            assert (expected - unguided).abs().max() > 1e-4  # the guidance really moved the sample
    print(f"ddim_sample vs our DDIM step ({mode}, {route}, eta {eta}, {schedule}): max error {max(errors):.2e}")


@pytest.mark.parametrize("mode", ["x0", "xt"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_sample_loop_with_the_conditioner_equals_our_sample(parts, monkeypatch, mode, eta):
    unet, _ = parts
    sampler = ours(parts, mode, eta)
    labels, seeds = torch.tensor([1, 3]), [101, 202]
    shape = (3, 16, 16)
    x_T = sampler.noise_source(seeds, INITIAL_NOISE_STREAM, shape, "cpu")
    # The per-step noise Sampler.sample draws (eta > 0), in the loop's order; eta 0: any (sigma is 0).
    noises = [sampler.noise_source(seeds, i, shape, "cpu") if eta else torch.randn(2, *shape)
              for i in reversed(range(int(STEPS)))]
    diffusion = conditioner_for(sampler, mode).patch(spaced_diffusion(), unet)
    left = inject(monkeypatch, noises)
    loop = dict(noise=x_T, clip_denoised=True, cond_fn=lambda *a, **k: None,
                model_kwargs={"y": torch.tensor(PRIOR_MAP)[labels]}, eta=eta)
    trajectory = tolerance(torch.float32, "trajectory")
    if mode == "x0":
        final = diffusion.ddim_sample_loop(unet, (2, *shape), **loop)  # free-running
        ours_final = sampler.sample(labels, seeds)
        torch.testing.assert_close(final.clamp(-1, 1), ours_final, **trajectory)
        print(f"ddim_sample_loop vs Sampler.sample (x0, eta {eta}): max error {max_error(final.clamp(-1, 1), ours_final):.2e}")
    else:
        # Mode xt differentiates through clip(x0): compared step by step along guided-diffusion's own
        # loop (as tests/test_frontends_guided_diffusion.py does for p_sample_loop).
        x, worst = x_T, 0.0
        steps = zip(reversed(range(int(STEPS))), diffusion.ddim_sample_loop_progressive(unet, (2, *shape), **loop))
        for k, (i, out) in enumerate(steps):
            expected = sampler.step(x, i, labels, noise=noises[k] if i > 0 else None)
            torch.testing.assert_close(out["sample"], expected, **TOLERANCE)
            worst = max(worst, max_error(out["sample"], expected))
            x = out["sample"]
        print(f"ddim_sample_loop_progressive vs Sampler.step (xt, eta {eta}): max error {worst:.2e}")
    assert left == []


def test_the_window_and_scale_zero(parts, monkeypatch):
    # window=(low, high) in the loop's own t guides exactly our guide_t_range's steps; an unguided step
    # (outside it, or scale 0) is ddim_sample's own unconditioned step, bit for bit.
    unet, _ = parts
    sampler = ours(parts, "x0", 0.0, guide_t_range=(5, 12))
    labels, seeds = torch.tensor([0, 2]), [7, 8]
    shape = (3, 16, 16)
    x_T = sampler.noise_source(seeds, INITIAL_NOISE_STREAM, shape, "cpu")
    loop = dict(noise=x_T, clip_denoised=True, cond_fn=lambda *a, **k: None,
                model_kwargs={"y": torch.tensor(PRIOR_MAP)[labels]})
    diffusion = conditioner_for(sampler, "x0", window=(5, 12)).patch(spaced_diffusion(), unet)
    windowed = diffusion.ddim_sample_loop(unet, (2, *shape), **loop)
    torch.testing.assert_close(windowed.clamp(-1, 1), sampler.sample(labels, seeds), **tolerance(torch.float32, "trajectory"))

    x, t = torch.randn(2, *shape), torch.full((2,), 15)
    plain = spaced_diffusion().ddim_sample(unet, x, t, model_kwargs=loop["model_kwargs"])["sample"]
    for conditioner in (conditioner_for(sampler, "x0", window=(5, 12)), IGDSConditioner(sampler.guidance_fn, scale=0.0)):
        patched = conditioner.patch(spaced_diffusion(), unet)
        with torch.no_grad():
            out = patched.ddim_sample(unet, x, t, cond_fn=conditioner.cond_fn, model_kwargs=loop["model_kwargs"])
        assert torch.equal(out["sample"], plain)


def test_the_with_grad_route_of_forks(parts, monkeypatch):
    # guided-diffusion-sdk's ddim_sample_with_grad computes p_mean_var with autograd on and calls
    # condition_score_with_grad: patched (mode xt differentiates the loop's own pred_xstart) and cond_fn route.
    unet, _ = parts
    if not hasattr(gd.GaussianDiffusion, "ddim_sample_with_grad"):
        pytest.skip("this guided-diffusion has no ddim_sample_with_grad")
    for mode in ("x0", "xt"):
        sampler = ours(parts, mode, 0.3)
        x, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
        noise = torch.randn(2, 3, 16, 16)
        expected = sampler.step(x, 7, labels, noise)
        for route in ("patch", "cond_fn_with_grad"):
            diffusion = spaced_diffusion()
            conditioner = conditioner_for(sampler, mode)
            if route == "patch":
                conditioner.patch(diffusion, unet)
            inject(monkeypatch, [noise])
            with torch.no_grad():
                actual = diffusion.ddim_sample_with_grad(unet, x, torch.full((2,), 7), cond_fn=conditioner.cond_fn_with_grad,
                                                         model_kwargs={"y": torch.tensor(PRIOR_MAP)[labels]}, eta=0.3)
            torch.testing.assert_close(actual["sample"], expected, **TOLERANCE)


def test_patch_and_unpatch_and_cfg_refusal(parts):
    sampler = ours(parts, "x0", 0.0)
    conditioner = conditioner_for(sampler, "x0")
    diffusion = conditioner.patch(spaced_diffusion())
    assert {"condition_mean", "condition_score"} <= set(vars(diffusion))
    out = {"pred_xstart": torch.zeros(2, 3, 16, 16), "mean": torch.zeros(2, 3, 16, 16), "variance": torch.ones(1)}
    # A classifier-free guidance batch (DiT's rules) is checked by condition_score as by condition_mean.
    with pytest.raises(IGDSInputError, match="clip_denoised=False"):
        diffusion.condition_score(None, out, out["mean"], torch.tensor([3, 3]),
                                  {"y": torch.tensor([3, 1000]), "cfg_scale": 4.0})
    IGDSConditioner.unpatch(diffusion)
    assert not {"condition_mean", "condition_score", "condition_score_with_grad"} & set(vars(diffusion))
