"""The eager sampler: one guided step against guided-diffusion + autograd, batch independence, bad input."""

import pytest
import torch

from factories import tiny_adm, tiny_ve
from igds_fast.guidance import GuidanceConfig
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.errors import IGDSInputError
from igds_fast.guidance.objective import igds_objective
from igds_fast.sampling import Sampler, fp32_reference_math
from igds_fast.seeding import INITIAL_NOISE_STREAM

gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
respace = pytest.importorskip("guided_diffusion.respace")

STEPS = "20"
NUM_CLASSES = 4
PRIOR_MAP = [3, 17, 250, 999]  # VE classes are a subset of the 1000-class prior


def reference_diffusion(learn_sigma=True):
    return respace.SpacedDiffusion(
        use_timesteps=respace.space_timesteps(1000, STEPS),
        betas=gd.get_named_beta_schedule("linear", 1000),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE if learn_sigma else gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
        rescale_timesteps=False,
    )


@pytest.fixture(scope="module")
def parts():
    unet = tiny_adm(image_size=16)
    ve = tiny_ve(num_classes=NUM_CLASSES, resolution=24)  # a different resolution: the resize is on the path
    schedule = DiffusionSchedule(ScheduleConfig("linear", 1000, STEPS))
    return unet, ve, schedule


def make_sampler(parts, **guidance):
    unet, ve, schedule = parts
    return Sampler(unet, schedule, ve, GuidanceConfig(**guidance), prior_class_map=PRIOR_MAP)


def objective_fn(ve, labels, beta, tau, gamma=0.0):
    def fn(image):
        z = ve.features(image)
        return igds_objective(z, labels, ve.weight, ve.bias, ve.log_centroids, beta, tau, gamma)

    return fn


def patched_noise(monkeypatch, noise):
    monkeypatch.setattr(gd.th, "randn_like", lambda x: noise.clone())


@pytest.mark.parametrize("i", [0, 7, 19])
def test_unguided_step_equals_guided_diffusion_p_sample(parts, monkeypatch, i):
    unet, ve, schedule = parts
    sampler = make_sampler(parts, scale=0.0)
    x = torch.randn(3, 3, 16, 16)
    labels = torch.tensor([0, 3, 1])
    noise = torch.randn_like(x)
    ours = sampler.step(x, i, labels, noise)
    patched_noise(monkeypatch, noise)
    t = torch.full((3,), i)
    with torch.no_grad():
        ref = reference_diffusion().p_sample(unet, x, t, model_kwargs={"y": torch.tensor(PRIOR_MAP)[labels]})
    torch.testing.assert_close(ours, ref["sample"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["autograd", "analytic"])
@pytest.mark.parametrize("i", [1, 12])
def test_guided_x0_step_equals_reference(parts, monkeypatch, head, i):
    """mu~ = mu + s sigma^2 dJ/dx0 at the clipped x0 prediction (IGDS_SPEC section 3, mode x0)."""
    unet, ve, schedule = parts
    scale, beta, tau = 3.0, 0.7, 0.8
    sampler = make_sampler(parts, scale=scale, beta=beta, tau=tau, head=head)
    x = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([2, 0, 1, 2])
    noise = torch.randn_like(x)
    ours = sampler.step(x, i, labels, noise)

    diffusion = reference_diffusion()
    t = torch.full((4,), i)
    y = torch.tensor(PRIOR_MAP)[labels]
    with torch.no_grad():
        out = diffusion.p_mean_variance(unet, x, t, clip_denoised=True, model_kwargs={"y": y})
    x0 = out["pred_xstart"].detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective_fn(ve, labels, beta, tau)(x0).sum(), x0)
    assert grad.abs().max() > 0
    expected = out["mean"] + scale * out["variance"] * grad
    expected = expected + (i != 0) * torch.exp(0.5 * out["log_variance"]) * noise
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # guidance moved the sample: the test would notice a dropped gradient
    unguided = make_sampler(parts, scale=0.0).step(x, i, labels, noise)
    assert (ours - unguided).abs().max() > 1e-4


def test_guided_xt_step_equals_autograd_through_unet(parts, monkeypatch):
    """Mode xt: guided-diffusion's p_sample with cond_fn = s * d J(x0_hat(UNet(x_t))) / d x_t."""
    unet, ve, schedule = parts
    scale, beta, tau, i = 2.0, 0.5, 1.0, 9
    sampler = make_sampler(parts, scale=scale, beta=beta, tau=tau, mode="xt")
    x = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([1, 3])
    y = torch.tensor(PRIOR_MAP)[labels]
    noise = torch.randn_like(x)
    ours = sampler.step(x, i, labels, noise)

    diffusion = reference_diffusion()
    objective = objective_fn(ve, labels, beta, tau)

    def cond_fn(x_t, t, y=None):
        with torch.enable_grad():
            leaf = x_t.detach().requires_grad_(True)
            out = diffusion.p_mean_variance(unet, leaf, torch.full((2,), i), clip_denoised=True, model_kwargs={"y": y})
            (grad,) = torch.autograd.grad(objective(out["pred_xstart"]).sum(), leaf)
        return scale * grad

    patched_noise(monkeypatch, noise)
    with torch.no_grad():
        ref = diffusion.p_sample(unet, x, torch.full((2,), i), cond_fn=cond_fn, model_kwargs={"y": y})
    torch.testing.assert_close(ours, ref["sample"], rtol=1e-5, atol=1e-5)


def test_guidance_window(parts):
    x = torch.randn(1, 3, 16, 16)
    labels = torch.tensor([1])
    windowed = make_sampler(parts, scale=2.0, beta=0.3, guide_from_step=5, guide_until_step=10)
    unguided = make_sampler(parts, scale=0.0)
    guided = make_sampler(parts, scale=2.0, beta=0.3)
    # respaced index i = 19 - step
    for step, inside in [(4, False), (5, True), (10, True), (11, False)]:
        i = 19 - step
        out = windowed.step(x, i, labels)
        reference = (guided if inside else unguided).step(x, i, labels)
        torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_sample_depends_only_on_seed_and_label(parts):
    unet, ve, _ = parts
    short = DiffusionSchedule(ScheduleConfig("linear", 1000, "6"))  # the full loop, kept short for CI
    sampler = Sampler(unet, short, ve, GuidanceConfig(scale=2.0, beta=0.5), prior_class_map=PRIOR_MAP)
    labels, seeds = [0, 1, 2, 1], [101, 202, 303, 404]
    states = []  # x_{i-1} after every step of the batch of four
    full = sampler.sample(labels, seeds, callback=lambda i, t, x, x0: states.append(x.clone()))
    assert full.shape == (4, 3, 16, 16) and full.abs().max() <= 1.0
    assert torch.isfinite(full).all() and full.std() > 0.05
    torch.testing.assert_close(full, states[-1].clamp(-1, 1), rtol=0, atol=0)
    # Other batch sizes and orders, every step from the batch of four's own x_t with the same noise:
    # batched kernels round differently for another batch size (equal up to float rounding), and a
    # free-running guided trajectory amplifies those last bits (seen: 1.2e-2 after 6 steps for one
    # random-weight draw), so the property is checked where it lives, one step at a time.
    shape = tuple(full.shape[1:])
    befores = [sampler.noise_source(seeds, INITIAL_NOISE_STREAM, shape, "cpu")] + states[:-1]
    for rows in ([2, 0], [3]):
        for k, i in enumerate(reversed(range(short.num_steps))):
            row_seeds = [seeds[r] for r in rows]
            noise = sampler.noise_source(row_seeds, i, shape, "cpu") if i > 0 else None
            out = sampler.step(befores[k][rows], i, [labels[r] for r in rows], noise=noise)
            torch.testing.assert_close(out, states[k][rows], rtol=0, atol=1e-4)
    # a different seed or label gives a different image
    assert (full[1] - full[3]).abs().max() > 1e-2
    other_label = sampler.sample([3], [404])
    assert (other_label[0] - full[3]).abs().max() > 1e-3


def test_bad_batches_fail_before_sampling(parts):
    sampler = make_sampler(parts, scale=1.0)
    for labels, seeds, message in [
        ([0, 4], [1, 2], r"labels outside \[0, 4\): \[4\]"),
        ([-1], [1], "labels outside"),
        ([0, 1], [1], "2 labels but 1 seeds"),
        ([], [], "no labels"),
    ]:
        with pytest.raises(IGDSInputError, match=message) as info:
            sampler.sample(labels, seeds)
        assert "\n" not in str(info.value)


def test_mismatched_parts_are_rejected(parts):
    unet, ve, schedule = parts
    with pytest.raises(IGDSInputError, match="VE has 4 classes but the prior has 1000"):
        Sampler(unet, schedule, ve, GuidanceConfig())
    with pytest.raises(IGDSInputError, match="prior_class_map has 3 entries"):
        Sampler(unet, schedule, ve, GuidanceConfig(), prior_class_map=[1, 2, 3])
    gray_ve = tiny_ve(num_classes=NUM_CLASSES, channels=1)
    with pytest.raises(IGDSInputError, match="1-channel images but the prior makes 3"):
        Sampler(unet, schedule, gray_ve, GuidanceConfig(), prior_class_map=PRIOR_MAP)
    with pytest.raises(IGDSInputError, match="unknown backend"):
        Sampler(unet, schedule, ve, GuidanceConfig(), backend="warp", prior_class_map=PRIOR_MAP)
    sampler = make_sampler(parts)
    with pytest.raises(IGDSInputError, match="resolution|size|16"):
        sampler.step(torch.randn(1, 3, 8, 8), 3, torch.tensor([0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tau=0.0), "tau must be positive"),
        (dict(tau=-1.0), "tau must be positive"),
        (dict(tau=float("inf")), "tau must be positive and finite"),
        (dict(scale=-1.0), "scale must be >= 0"),
        (dict(beta=float("nan")), "beta must be a finite number"),
        (dict(mode="x1"), "mode"),
        (dict(head="cuda"), "head"),
        (dict(guide_from_step=5, guide_until_step=4), "guide_until_step"),
    ],
)
def test_bad_guidance_config(kwargs, message):
    with pytest.raises(IGDSInputError, match=message) as info:
        GuidanceConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_non_finite_gradient_names_step_and_labels(parts):
    unet, ve, schedule = parts
    broken = tiny_ve(num_classes=NUM_CLASSES, resolution=24)
    with torch.no_grad():
        broken.log_centroids[2, 0] = float("-inf")  # KL to class 2's centroid becomes inf - inf
    sampler = Sampler(unet, schedule, broken, GuidanceConfig(scale=1.0, beta=0.5), prior_class_map=PRIOR_MAP)
    with pytest.raises(IGDSInputError, match=r"non-finite guidance gradient at sampling step 0 .*labels \[2\]") as info:
        sampler.sample([0, 2, 1], [1, 2, 3])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_batch_invariant_mode_is_bitwise_independent_of_the_batch(parts, gamma):
    unet, ve, _ = parts
    short = DiffusionSchedule(ScheduleConfig("linear", 1000, "4"))
    sampler = Sampler(unet, short, ve, GuidanceConfig(scale=2.0, beta=0.5, gamma=gamma),
                      prior_class_map=PRIOR_MAP, batch_invariant=True)
    full = sampler.sample([0, 1, 2, 1], [101, 202, 303, 404], group_ids=[7, 8, 9, 8])
    part = sampler.sample([2, 1, 1], [303, 404, 202], group_ids=[9, 8, 8])
    assert torch.equal(part[0], full[2])
    assert torch.equal(part[1], full[3]) and torch.equal(part[2], full[1])
    if gamma == 0.0:
        assert torch.equal(sampler.sample([1], [404])[0], full[3])


@pytest.mark.parametrize("group_ids", [None, [5, 2, 2]])
def test_padded_batch_returns_the_unpadded_images(parts, group_ids):
    # Batch-invariant mode steps each diversity group alone, so padding must leave the real images
    # bit for bit unchanged: the fillers (repeats of the last image) sit in groups of their own,
    # also when the groups default to the labels (here two images of class 1 share one).
    unet, ve, _ = parts
    short = DiffusionSchedule(ScheduleConfig("linear", 1000, "4"))
    sampler = Sampler(unet, short, ve, GuidanceConfig(scale=2.0, beta=0.5, gamma=0.5),
                      prior_class_map=PRIOR_MAP, batch_invariant=True)
    seeds = [11, 12, 13]
    plain = sampler.sample([0, 1, 1], seeds, group_ids=group_ids)
    padded = sampler.sample([0, 1, 1], seeds, group_ids=group_ids, pad_to=6)
    assert padded.shape == plain.shape == (3, 3, 16, 16)
    assert torch.equal(padded, plain)
    assert torch.equal(sampler.sample([0, 1, 1], seeds, group_ids=group_ids, pad_to=3), plain)
    for bad in (2, 0, 4.0, True):
        with pytest.raises(IGDSInputError, match="pad_to must be an integer >= the batch size 3"):
            sampler.sample([0, 1, 1], seeds, pad_to=bad)


def test_padding_groups_stay_apart_from_real_groups():
    from igds_fast.sampling.sampler import _pad_batch

    labels = torch.tensor([3, 1, 1])
    padded_labels, seeds, groups = _pad_batch(labels, [7, 8, 9], labels, 6)
    assert padded_labels.tolist() == [3, 1, 1, 1, 1, 1] and seeds == [7, 8, 9, 9, 9, 9]
    assert groups.tolist() == [3, 1, 1, -2, -1, 0]
    _, _, groups = _pad_batch(labels, [7, 8, 9], torch.tensor([0, -2, 4]), 5)
    assert groups.tolist() == [0, -2, 4, -4, -3]
    assert _pad_batch(labels, [7, 8, 9], None, 5)[2] is None  # gamma = 0: nothing couples


def test_fp32_reference_math_on_cuda_turns_tf32_off_and_cudnn_deterministic_then_restores():
    # The flags are process state that exists without a GPU, so the CUDA branch is checked here.
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    try:
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
        with fp32_reference_math(torch.device("cuda")):
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            assert not torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"
        with fp32_reference_math(torch.device("cpu")):  # CPU: nothing changes
            assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
        torch.backends.cudnn.allow_tf32 = before[2]
        torch.set_float32_matmul_precision(before[3])


@pytest.mark.parametrize("backend", ["eager", "fused"])
@pytest.mark.parametrize("reference", [True, False])
def test_eager_steps_run_under_fp32_reference_math(backend, reference, monkeypatch):
    import igds_fast.sampling.eager as sampler_module

    devices = []
    real = sampler_module.fp32_reference_math

    def recording(device):
        devices.append(torch.device(device).type)
        return real(device)

    monkeypatch.setattr(sampler_module, "fp32_reference_math", recording)
    unet, ve = tiny_adm(), tiny_ve()
    schedule = DiffusionSchedule(ScheduleConfig("linear", 1000, "3"))
    sampler = Sampler(unet, schedule, ve, GuidanceConfig(scale=1.0), backend=backend, prior_class_map=PRIOR_MAP,
                      reference_numerics=reference)
    sampler.sample([0, 1], [5, 6])
    if reference and backend == "eager":
        assert devices == ["cpu"]  # once per batch, around the whole loop (not set and restored per step)
    else:  # the plain-PyTorch baseline bench/sampler.py times, and the kernel path (a fast path)
        assert devices == []


def test_a_batch_stepped_one_step_at_a_time_is_sample(parts):
    # Sampler.batch is sample's own loop, stepped by the caller (what the benchmarks and profilers use).
    unet, ve, _ = parts
    sampler = Sampler(unet, DiffusionSchedule(ScheduleConfig("linear", 1000, "4")), ve,
                      GuidanceConfig(scale=1.0, beta=0.5, gamma=0.5), prior_class_map=PRIOR_MAP)
    labels, seeds = [0, 2, 2], [31, 32, 33]
    expected, expected_trace = sampler.sample(labels, seeds, pad_to=4, trace=True)
    finished = []
    run = sampler.batch(labels, seeds, pad_to=4, trace=True, on_steps_done=lambda done, n: finished.append(done))
    with run:
        assert run.count == 3 and run.x.shape == (3, 3, 16, 16) and run.remaining == 4
        indices = []
        while run.remaining:
            indices.append(run.step())
        with pytest.raises(IGDSInputError, match="all 4 steps of this batch have run"):
            run.step()
        run.finish()
    assert indices == [3, 2, 1, 0] and finished == [1, 2, 3, 4]
    assert torch.equal(run.x.clamp(-1, 1), expected)
    trace = run.read_trace()
    assert set(trace) == set(expected_trace)
    for term, values in trace.items():  # NaN where a step is not guided
        torch.testing.assert_close(values, expected_trace[term], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(IGDSInputError, match="runs once"):
        run.__enter__()


def test_a_batch_refuses_steps_out_of_order_in_one_line(parts):
    sampler = make_sampler(parts, scale=1.0)
    run = sampler.batch([0, 1], [1, 2])
    errors = []
    for call, message in [(run.step, r"step\(\) runs inside `with sampler.batch"),
                          (run.finish, r"finish\(\) runs inside"), (run.read_trace, "needs a run entered with")]:
        with pytest.raises(IGDSInputError, match=message) as info:
            call()
        errors.append(str(info.value))
    with run:
        run.step()
        with pytest.raises(IGDSInputError, match=f"19 of {STEPS} steps have not run") as info:
            run.finish()
        errors.append(str(info.value))
    with pytest.raises(IGDSInputError, match="labels outside") as info:
        sampler.batch([0, 9], [1, 2])  # checked when the run is made, before anything runs
    errors.append(str(info.value))
    assert not any("\n" in error for error in errors)
