"""IGDSConditioner in DiT's / MinimaxDiffusion's own CFG loop, against our Sampler on the same latent prior.

Their sample.py runs guided-diffusion's code (DiT's diffusion/ package: create_diffusion(str(steps)) =
create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear",
timestep_respacing=str(steps)), EPSILON, LEARNED_RANGE) on the doubled batch [z; z] with y = [y; null]:

    diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                            model_kwargs=dict(y=y, cfg_scale=s), ...);  samples.chunk(2)[0]

Here the model is DiT's forward_with_cfg (models.py, verbatim, bound to our DiT), the guidance decodes
the x0 latent with a LatentDecoder, and the first half of p_sample / p_sample_loop with the conditioner
(patched condition_mean, or the cond_fn route) equals Sampler(ClassifierFreeGuidance(dit, s, 3), ...)
fed the same noise, in modes x0 and xt, within the float32 trajectory tolerance.
"""
from __future__ import annotations

import os
import types

import pytest
import torch

from factories import tiny_dit, tiny_vae, tiny_ve
from igds_fast import DiffusionSchedule, GuidanceConfig, Sampler, ScheduleConfig
from igds_fast.errors import IGDSInputError
from igds_fast.frontends import IGDSConditioner, label_map_from_class_map
from igds_fast.models.cfg import ClassifierFreeGuidance
from igds_fast.models.vae import LatentDecoder
from igds_fast.seeding import INITIAL_NOISE_STREAM
from tolerances import tolerance

gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
script_util = pytest.importorskip("guided_diffusion.script_util")

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = "10"
CFG = 4.0  # DiT's default cfg_scale
NULL = 4  # tiny_dit's null class (= num_classes)
PRIOR_MAP = [2, 0, 3, 1]  # VE class -> DiT class
TOLERANCE = tolerance(torch.float32, "trajectory")
TABLES = ("betas", "alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
          "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")


def create_diffusion(steps: str):
    """DiT's diffusion.create_diffusion(steps) (its defaults), built from guided-diffusion's own code."""
    return script_util.create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear",
                                                 timestep_respacing=steps, rescale_timesteps=False)


def forward_with_cfg(self, x, t, y, cfg_scale):
    """DiT's models.py DiT.forward_with_cfg, verbatim (self.forward: the DiT)."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = self.forward(combined, t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def original_layout(dit):
    """A stand-in of facebookresearch's DiT: no null_class attribute, the null row in y_embedder's table."""
    return types.SimpleNamespace(forward=dit, y_embedder=dit.y_embedder)


@pytest.fixture(scope="module")
def parts():
    with torch.random.fork_rng():
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        dit = tiny_dit(input_size=8, num_classes=4)
        return dit, LatentDecoder(tiny_vae(latent_channels=4, scale_factor=2)), tiny_ve(num_classes=4, resolution=16)


def ours(parts, mode, **guidance):
    dit, decoder, ve = parts
    config = GuidanceConfig(scale=10.0, beta=0.6, tau=0.9, clip_x0=False, mode=mode, **guidance)
    return Sampler(ClassifierFreeGuidance(dit, CFG, 3), DiffusionSchedule(ScheduleConfig("linear", 1000, STEPS)),
                   ve, config, prior_class_map=PRIOR_MAP, decoder=decoder)


def conditioner_for(sampler, mode, **options):
    return IGDSConditioner(sampler.guidance_fn, scale=sampler.guidance.scale, mode=mode, clip_denoised=False,
                           label_map=label_map_from_class_map(PRIOR_MAP, NULL), **options)


def cfg_kwargs(labels):
    y = torch.tensor(PRIOR_MAP)[labels]
    return {"y": torch.cat([y, torch.full_like(y, NULL)]), "cfg_scale": CFG}


def beyond_tolerance(actual, reference) -> float:
    """How many times the trajectory tolerance apart two results are (the largest element's ratio)."""
    rtol, atol = TOLERANCE["rtol"], TOLERANCE["atol"]
    return float(((actual - reference).abs() / (atol + rtol * reference.abs())).max())


def inject(monkeypatch, noises):
    """guided-diffusion's th.randn_like returns these tensors, in order."""
    queue = list(noises)
    monkeypatch.setattr(gd.th, "randn_like", lambda x: queue.pop(0).clone())
    return queue


@pytest.mark.parametrize("steps", [STEPS, "50"])
def test_the_schedule_tables_are_dits_create_diffusion(steps):
    ours_ = DiffusionSchedule(ScheduleConfig(sampling_steps=steps))
    ref = create_diffusion(steps)
    assert ours_.num_steps == ref.num_timesteps == int(steps)
    assert ours_.timestep_map.tolist() == list(ref.timestep_map)
    for name in TABLES:
        assert torch.equal(getattr(ours_, name), torch.from_numpy(getattr(ref, name)).float()), name


@pytest.mark.parametrize("mode", ["x0", "xt"])
@pytest.mark.parametrize("route", ["patch", "bind"])
@pytest.mark.parametrize("i", [1, 7])
def test_p_sample_of_the_cfg_batch_equals_our_step(parts, monkeypatch, mode, route, i):
    dit = parts[0]
    sampler = ours(parts, mode)
    x = torch.randn(3, 4, 8, 8)
    labels = torch.tensor([2, 0, 3])
    noise, other = torch.randn_like(x), torch.randn_like(x)
    expected = sampler.step(x, i, labels, noise)

    diffusion = create_diffusion(STEPS)
    conditioner = conditioner_for(sampler, mode)
    if route == "patch":  # our DiT's forward_with_cfg: the null class from the method's owner (null_class)
        model = types.MethodType(forward_with_cfg, dit)
        conditioner.patch(diffusion, model)
    else:  # an unpatched diffusion, the original DiT's layout: the null class from y_embedder
        model = types.MethodType(forward_with_cfg, original_layout(dit))
        conditioner.bind(model, diffusion)
    x2, t = torch.cat([x, x]), torch.full((6,), i)
    inject(monkeypatch, [torch.cat([noise, other])])
    with torch.no_grad():
        actual = diffusion.p_sample(model, x2, t, clip_denoised=False, cond_fn=conditioner.cond_fn,
                                    model_kwargs=cfg_kwargs(labels))["sample"]
    torch.testing.assert_close(actual[:3], expected, **TOLERANCE)
    # The copy's mean is not shifted: the second half is what the unguided loop makes of it.
    inject(monkeypatch, [torch.cat([noise, other])])
    with torch.no_grad():
        plain = create_diffusion(STEPS).p_sample(model, x2, t, clip_denoised=False, model_kwargs=cfg_kwargs(labels))
    assert torch.equal(actual[3:], plain["sample"][3:])
    assert beyond_tolerance(actual[:3], plain["sample"][:3]) > 10  # the guidance really moved the sample
    unguided = ours(parts, mode, guide_from_step=100).step(x, i, labels, noise)
    torch.testing.assert_close(plain["sample"][:3], unguided, **TOLERANCE)


@pytest.mark.parametrize("mode", ["x0", "xt"])
def test_p_sample_loop_of_the_cfg_batch_equals_our_trajectory(parts, monkeypatch, mode):
    dit = parts[0]
    sampler = ours(parts, mode)
    labels, seeds = torch.tensor([1, 3]), [11, 22]
    shape = (4, 8, 8)
    x_T = sampler.noise_source(seeds, INITIAL_NOISE_STREAM, shape, "cpu")
    steps = []
    final = sampler.sample(labels, seeds, x_T=x_T, decode=False, callback=lambda i, t, x, x0: steps.append(x.clone()))

    model = types.MethodType(forward_with_cfg, dit)
    diffusion = conditioner_for(sampler, mode).patch(create_diffusion(STEPS), model)
    # The step noise Sampler.sample draws, in p_sample_loop's order (i = N-1 .. 0; the last is masked);
    # the copies get noise of their own (it never reaches the samples: forward_with_cfg reads x[:B]).
    noises = [torch.cat([sampler.noise_source(seeds, i, shape, "cpu"), torch.randn(2, *shape)])
              for i in reversed(range(int(STEPS)))]
    left = inject(monkeypatch, noises)
    z = torch.cat([x_T, x_T], 0)
    outs = list(diffusion.p_sample_loop_progressive(model, z.shape, z, clip_denoised=False, device="cpu",
                                                    cond_fn=lambda *a, **k: None, model_kwargs=cfg_kwargs(labels)))
    assert left == [] and len(outs) == len(steps) == int(STEPS)
    for k, (out, x) in enumerate(zip(outs, steps)):
        torch.testing.assert_close(out["sample"].chunk(2, dim=0)[0], x, **TOLERANCE, msg=lambda m: f"step {k}: {m}")
    samples, _ = outs[-1]["sample"].chunk(2, dim=0)
    torch.testing.assert_close(samples, final, **TOLERANCE)
    # A random DiT's x0 predictions are far from any data (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)):
    # the latents grow to O(100) over the loop, the guidance's share stays well beyond the tolerance.
    unguided = ours(parts, mode, guide_from_step=100).sample(labels, seeds, x_T=x_T, decode=False)
    assert beyond_tolerance(final, unguided) > 10


@pytest.mark.parametrize("mode", ["x0", "xt"])
def test_the_with_grad_route_of_forks_on_the_cfg_batch(parts, monkeypatch, mode):
    # guided-diffusion-sdk (IGD-style forks) computes p_mean_var with autograd on and passes it.
    if not hasattr(gd.GaussianDiffusion, "p_sample_with_grad"):
        pytest.skip("this guided-diffusion has no p_sample_with_grad")
    sampler = ours(parts, mode)
    x, labels, noise = torch.randn(2, 4, 8, 8), torch.tensor([3, 1]), torch.randn(2, 4, 8, 8)
    expected = sampler.step(x, 5, labels, noise)
    inject(monkeypatch, [torch.cat([noise, torch.randn_like(noise)])])
    with torch.no_grad():
        actual = create_diffusion(STEPS).p_sample_with_grad(
            types.MethodType(forward_with_cfg, parts[0]), torch.cat([x, x]), torch.full((4,), 5), clip_denoised=False,
            cond_fn=conditioner_for(sampler, mode).cond_fn_with_grad, model_kwargs=cfg_kwargs(labels))
    torch.testing.assert_close(actual["sample"][:2], expected, **TOLERANCE)


def test_bad_cfg_batches_are_one_line_errors(parts):
    dit = parts[0]
    sampler = ours(parts, "x0")
    out = {"pred_xstart": torch.randn(4, 4, 8, 8), "mean": torch.zeros(4, 4, 8, 8), "variance": torch.ones(1)}
    t = torch.tensor([3] * 4)

    def expect(diffusion, kwargs, match, rows=4):
        part = {key: value[:rows] for key, value in out.items() if key != "variance"} | {"variance": out["variance"]}
        with pytest.raises(IGDSInputError, match=match) as error:
            diffusion.condition_mean(None, part, part["mean"], t[:rows], kwargs)
        assert "\n" not in str(error.value)

    diffusion = conditioner_for(sampler, "x0").patch(create_diffusion(STEPS), types.MethodType(forward_with_cfg, dit))
    y = torch.tensor([2, 0])
    expect(diffusion, {"y": torch.tensor([2, 0, NULL, 3]), "cfg_scale": CFG},
           r"the second half has classes \[3\], not the null class 4")
    expect(diffusion, {"y": torch.tensor([2, 0, NULL]), "cfg_scale": CFG}, "odd batch of 3", rows=3)
    expect(diffusion, {"y": y, "cfg_scale": CFG}, r"needs 4 labels \[y; null\]")
    # A plain function knows no null class: the null_class argument gives it (x0 mode: no model needed).
    explicit = conditioner_for(sampler, "x0", null_class=NULL).patch(create_diffusion(STEPS))
    expect(explicit, {"y": torch.tensor([2, 0, 1, NULL]), "cfg_scale": CFG}, r"classes \[1\], not the null class 4")
    unchecked = conditioner_for(sampler, "x0").patch(create_diffusion(STEPS))
    mean = unchecked.condition_mean(None, out, out["mean"], t, {"y": torch.tensor([2, 0, 1, NULL]), "cfg_scale": CFG})
    assert torch.isfinite(mean).all() and torch.equal(mean[2:], torch.zeros(2, 4, 8, 8))
    with pytest.raises(IGDSInputError, match="null_class must be an integer"):
        conditioner_for(sampler, "x0", null_class=-1)
    # Without cfg_scale the batch is an ordinary one: 4 VE labels for 4 rows, the null class is no VE class.
    plain = diffusion.condition_mean(None, out, out["mean"], t, {"y": torch.tensor([2, 0, 3, 1])})
    assert plain.abs().flatten(1).amax(1).min() > 0
