"""DDIM on every backend: eta 1 against the DDPM posterior, the compiled step against eager (the fidelity
table of tests/test_compiled.py), the loop's host reads, the self-check, and the one-line refusals.

guided-diffusion's own ddim_sample is the reference of the eager DDIM step (tests/test_frontends_ddim.py);
the fused kernel against the eager update: tests/test_kernels_update.py; the fused step: tests/test_fused_step.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from factories import tiny_adm, tiny_ve
from host_reads import SyncingOpRecorder, host_reads
from test_compiled import (FP32_EAGER_COPIES, GPU_TEST_COMPILE, TOLERANCES, build_models, check_fidelity, gpu,
                           gpu_models, gpu_only, random_seeds, relative_error, teacher_forced_errors)
from tolerances import tolerance
from igds_fast import DiffusionSchedule, GuidanceConfig, Sampler, ScheduleConfig
from igds_fast.diffusion import SAMPLERS
from igds_fast.errors import IGDSInputError, IGDSNumericsError
from igds_fast.sampling import StepOps

pytestmark = pytest.mark.usefixtures("one_thread")

# DDIM's low-precision rows of the compiled fidelity table (tests/test_compiled.py TOLERANCES: per-step
# UNet rel L2, per-step x_{t-1} rel L2, final PSNR floor dB, VE agreement floor); the fp32 row holds for
# DDIM as it is. In bf16 the per-step x_{t-1} bound is larger: DDIM applies the guidance as an x0 shift
# of (1 - abar) / sqrt(abar) * s * g, of which sqrt(abar_prev) reaches x_{t-1} -- at the first of 6
# steps 6.3 s g, against DDPM's sigma^2 s g ~ s g -- and the bf16 encoder's gradient is the step's least
# exact part (its self-check tolerance is 1.0 relative). Measured on CPU (4 random tiny models, 4 images,
# eta 0 and 1): per-step x_{t-1} 1.7e-2 .. 9.3e-2 guided, <= 1e-4 unguided (same models: DDPM 2.5e-3 ..
# 7.8e-3); final PSNR 21-29 dB (DDPM 43-51), VE agreement 0.5-1.0 (a random VE's near-ties).
DDIM_BF16_TOLERANCES = {"bf16-cpu": (1.5e-2, 1.5e-1, 18.0, 0.5), "bf16-gpu": (2e-2, 1.5e-1, 18.0, 0.5)}


def ddim_pair(unet, ve, class_map, options, eta, steps="6", device="cpu", **guidance):
    """(eager fp32 DDIM sampler, compiled DDIM sampler), Philox noise."""
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps=steps), device=device)
    config = GuidanceConfig(**{"scale": 1.0, "beta": 0.5, **guidance})
    common = dict(noise="philox", prior_class_map=class_map, sampler="ddim", eta=eta)
    return (Sampler(unet, schedule, ve, config, **common),
            Sampler(unet, schedule, ve, config, backend="compiled", backend_options=options, **common))


# ---- eta 1 is DDPM's posterior --------------------------------------------------------------------
@pytest.mark.parametrize("guide", [False, True])
def test_eta_one_is_the_ddpm_posterior_step(rng_seed, guide):
    # DDIM at eta 1: sigma^2 = beta~ (the posterior variance) and sqrt(abar_prev) x0 + sqrt(1 - abar_prev -
    # sigma^2) eps = the posterior mean -- DDPM with fixed_variance "small" on a prior without learned sigma.
    # Guided, the two shifts differ (eps by sqrt(1 - abar) s g vs the mean by beta~ s g), so the guided
    # comparison takes DDIM's shifted x0 as DDPM's x0: then the posterior mean of that x0 must come out.
    unet = tiny_adm(image_size=16, learn_sigma=False)
    ve = tiny_ve(num_classes=4, resolution=16)
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps="10", fixed_variance="small"))
    config = GuidanceConfig(scale=2.0 if guide else 0.0, beta=0.3)
    ddim = Sampler(unet, schedule, ve, config, prior_class_map=[1, 2, 3, 4], sampler="ddim", eta=1.0)
    ddpm = Sampler(unet, schedule, ve, config, prior_class_map=[1, 2, 3, 4])
    torch.testing.assert_close(ddim.context.ddim.sigma[1:] ** 2, schedule.posterior_variance[1:], rtol=2e-4, atol=1e-9)
    x, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 3])
    for i in (9, 5, 1, 0):
        noise = torch.randn_like(x)
        got = ddim.step(x, i, labels, noise)
        if not guide:
            expected = ddpm.step(x, i, labels, noise)
        else:
            with torch.no_grad():
                output = unet(x, schedule.timestep_map[i].expand(3), ddim.prior_labels(labels))
            ops, inputs = StepOps(ddim.context), ddim.stepper.begin_batch(x, labels, None)[1].inputs(i, None)
            x0 = ops.predict_x0(x, output, inputs)
            grad, _ = ops.guide(x0, inputs)
            eps = schedule.predict_eps(x, x0, i) - ddim.context.ddim.sqrt_one_minus_alphas_cumprod[i] * (2.0 * grad)
            shifted = schedule.predict_x0(x, eps, i, clip=False)
            expected = schedule.posterior_mean(shifted, x, i)
            if i > 0:
                expected = expected + schedule.posterior_variance[i].sqrt() * noise
        torch.testing.assert_close(got, expected, **tolerance(torch.float32, "trajectory"))


# ---- the compiled backend ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aot_ddim():
    unet, ve, class_map, seed = build_models()
    options = dict(dtype="fp32", backend="aot_eager", channels_last=False)
    eager, compiled = ddim_pair(unet, ve, class_map, options, eta=0.5, steps="4", gamma=0.3)
    return eager, compiled, ve, seed


def test_fp32_compiled_ddim_matches_eager(aot_ddim):
    # Per-step UNet and x_{t-1} errors, final PSNR and VE agreement: the fp32 row of the fidelity table.
    eager, compiled, ve, seed = aot_ddim
    found = check_fidelity(eager, compiled, ve, TOLERANCES["fp32"], torch.tensor([0, 3, 1, 3]), random_seeds(4))
    print(f"model seed {seed}: {found}")
    assert compiled.self_check_report is not None  # the first step was checked against the eager DDIM step


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_compiled_copies_ddim_eta_and_xt_mode(eta):
    unet, ve, class_map, _ = build_models()
    for mode in ("x0", "xt"):
        eager, compiled = ddim_pair(unet, ve, class_map, FP32_EAGER_COPIES, eta=eta, steps="4", mode=mode, scale=2.0)
        errors = teacher_forced_errors(eager, compiled, torch.tensor([3, 1]), random_seeds(2))
        assert max(e[2] for e in errors) <= TOLERANCES["fp32"][1], errors


def test_bf16_copies_ddim_within_bf16_tolerances():
    unet, ve, class_map, seed = build_models()
    eager, compiled = ddim_pair(unet, ve, class_map, dict(dtype="bf16", compile=False, channels_last=False), eta=0.0)
    found = check_fidelity(eager, compiled, ve, DDIM_BF16_TOLERANCES["bf16-cpu"], torch.tensor([0, 1, 2, 3]),
                           random_seeds(4))
    print(f"model seed {seed}: {found}")
    unguided = ddim_pair(unet, ve, class_map, dict(dtype="bf16", compile=False, channels_last=False), eta=0.0, scale=0.0)
    errors = teacher_forced_errors(*unguided, torch.tensor([0, 1, 2, 3]), random_seeds(4))
    assert max(e[2] for e in errors) <= TOLERANCES["bf16-cpu"][1], errors  # unguided: DDPM's row holds


def test_the_self_check_names_the_ddim_update(monkeypatch):
    # A fault planted in the DDIM update kernel is caught by the self-check's "step" part, named as DDIM's.
    import igds_fast.sampling.fused as fused_module

    unet, ve, class_map, _ = build_models()
    eager, compiled = ddim_pair(unet, ve, class_map, FP32_EAGER_COPIES, eta=0.0, steps="3")
    original = fused_module.fused_ddim_update
    monkeypatch.setattr(fused_module, "fused_ddim_update", lambda *a, **k: original(*a, **k).mul_(1.1))
    with pytest.raises(IGDSNumericsError, match="fused DDIM update kernel") as info:
        compiled.sample([0, 1], random_seeds(2))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["eager", "fused", "compiled"])
def test_the_ddim_loop_reads_the_host_once_per_batch(kind, monkeypatch):
    unet, ve, class_map, _ = build_models()
    options = {"eager": {}, "fused": {"backend": "fused"},
               "compiled": {"backend": "compiled", "backend_options": dict(FP32_EAGER_COPIES, self_check=False)}}[kind]
    sampler = Sampler(unet, DiffusionSchedule(ScheduleConfig(sampling_steps="4")), ve, GuidanceConfig(scale=1.0),
                      prior_class_map=class_map, sampler="ddim", eta=0.5, noise="philox", **options)
    with sampler.batch(torch.tensor([0, 2]), random_seeds(2)) as run:
        calls = host_reads(monkeypatch)
        with SyncingOpRecorder(calls):
            while run.remaining:
                run.step()
        assert calls == [], f"host reads inside the loop: {sorted(set(calls))}"
        run.finish()


# ---- refusals --------------------------------------------------------------------------------------
def test_sampler_and_eta_are_refused_in_one_line():
    unet, ve, class_map, _ = build_models()
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps="3"))
    assert SAMPLERS == ("ddpm", "ddim")
    for kwargs, message in [(dict(eta=0.5), "eta applies to sampler 'ddim' only"),
                            (dict(sampler="plms"), "unknown sampler 'plms'"),
                            (dict(sampler="ddim", eta=1.5), r"eta must be a number in \[0, 1\]"),
                            (dict(sampler="ddim", eta=True), r"eta must be a number in \[0, 1\]")]:
        with pytest.raises(IGDSInputError, match=message) as info:
            Sampler(unet, schedule, ve, GuidanceConfig(), prior_class_map=class_map, **kwargs)
        assert "\n" not in str(info.value)
    sampler = Sampler(unet, schedule, ve, GuidanceConfig(), prior_class_map=class_map, sampler="ddim")
    assert sampler.eta == 0.0 and sampler.context.ddim.sigma.abs().max() == 0  # DDIM's default: deterministic
    assert Sampler(unet, schedule, ve, GuidanceConfig(), prior_class_map=class_map).eta is None


# ---- GPU: CUDA graphs --------------------------------------------------------------------------------
@gpu
@gpu_only
def test_gpu_ddim_under_graphs_matches_eager_and_the_direct_step():
    unet, ve, class_map, seed = gpu_models()
    eager, compiled = ddim_pair(unet, ve, class_map, dict(dtype="bf16", **GPU_TEST_COMPILE), eta=0.5, steps="25",
                                device="cuda")
    assert compiled.stepper.use_graphs
    labels = torch.tensor([0, 1, 2, 3], device="cuda")
    found = check_fidelity(eager, compiled, ve, DDIM_BF16_TOLERANCES["bf16-gpu"], labels, random_seeds(4))
    print(f"model seed {seed}: {found}")
    x, seeds = torch.randn(4, 3, 64, 64, device="cuda"), random_seeds(4)
    replayed = compiled.step(x, 12, labels, None, None, seeds).clone()
    compiled.stepper.use_graphs = False
    direct = compiled.step(x, 12, labels, None, None, seeds).clone()
    compiled.stepper.use_graphs = True
    assert relative_error(replayed, direct) <= 1e-3
    assert os.environ.get("TRITON_INTERPRET") != "1"
