"""FusedStep (Triton x0 / head / update kernels) against EagerStep, one step and whole short runs.

The diffusion prior is a minimal stand-in (`TinyUNet`: a callable with image_size, in_channels,
learn_sigma, num_classes — the ADM UNet of igds_fast.models is not in the tree yet). The VE is a
stand-in with the real `EncoderPreprocess` and a random projection encoder (`TinyVE`), plus one
test with a real `VariationalEstimator` around a ResNet-18 trunk.
"""
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import igds_fast.sampling.fused as fused_step_module
import igds_fast.sampling.step as sampler_module
from igds_fast.guidance import GuidanceConfig, IGDSGuidance
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.sampling.fused import FusedStep, KernelOps
from igds_fast.kernels import philox_normal
from igds_fast.preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess
from igds_fast.errors import IGDSInputError
from igds_fast.sampling import BACKENDS, EagerStep, Sampler, Stepper, fp32_reference_math

from tolerances import tolerance

gpu_only = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU with compiled Triton (IGDS_TEST_GPU=1)",
)


class TinyUNet(nn.Module):
    """UNet-shaped callable: (x [B,C,H,W], timesteps [B], y [B] or None) -> [B, 2C or C, H, W]."""

    def __init__(self, channels=3, image_size=8, learn_sigma=True, num_classes=4):
        super().__init__()
        self.in_channels, self.image_size = channels, image_size
        self.learn_sigma, self.num_classes = learn_sigma, num_classes
        out = 2 * channels if learn_sigma else channels
        self.conv = nn.Conv2d(channels, out, 3, padding=1)
        self.time = nn.Linear(1, out)
        self.embed = nn.Embedding(num_classes, out) if num_classes else None

    def forward(self, x, timesteps, y=None):
        h = self.conv(x) * 0.5 + self.time(timesteps.float()[:, None] / 1000.0)[:, :, None, None]
        if self.embed is not None:
            h = h + self.embed(y)[:, :, None, None]
        if self.learn_sigma:
            eps, v = h.chunk(2, dim=1)
            return torch.cat([eps, torch.tanh(v)], dim=1)
        return h


class TinyVE:
    """VE-shaped object: features(x) through the real EncoderPreprocess and a softplus projection."""

    def __init__(self, channels=3, classes=4, dim=24, resolution=6, tau=0.8, device="cpu"):
        self.preprocess = EncoderPreprocess(resolution, IMAGENET_MEAN[:channels], IMAGENET_STD[:channels]).to(device)
        self.projection = torch.randn(channels * resolution * resolution, dim, device=device) / resolution
        self.weight = torch.randn(classes, dim, device=device) * 2 / math.sqrt(dim)
        self.bias = torch.randn(classes, device=device)
        self.log_centroids = torch.log_softmax(torch.randn(classes, dim, device=device) * 2, dim=1)
        self.tau, self.num_classes = tau, classes

    def features(self, x):
        return F.softplus(self.preprocess(x).flatten(1) @ self.projection, beta=3.0)


def make_samplers(unet, ve, steps="6", device="cpu", prior_class_map=None, sampler="ddpm", eta=None, **guidance):
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps=steps), device=device)
    config = GuidanceConfig(**{"scale": 4.0, "beta": 0.5, **guidance})
    rule = dict(sampler=sampler, eta=eta, prior_class_map=prior_class_map)
    eager = Sampler(unet, schedule, ve, config, noise="philox", **rule)
    fused = Sampler(unet, schedule, ve, config, noise="philox", backend="fused", **rule)
    assert isinstance(fused.stepper, FusedStep) and isinstance(eager.stepper, EagerStep)
    return eager, fused


def random_seeds(count):
    return [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(count)]


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("gamma, groups", [(0.0, None), (0.7, "labels"), (0.7, [0, 1, 1, 2, 2])])
def test_one_step_matches_eager(rng_seed, learn_sigma, gamma, groups):
    unet, ve = TinyUNet(learn_sigma=learn_sigma), TinyVE()
    eager, fused = make_samplers(unet, ve, gamma=gamma)
    labels = torch.tensor([0, 3, 3, 1, 2])
    group_ids = None if groups in (None, "labels") else torch.tensor(groups)
    seeds = random_seeds(5)
    plain = Sampler(unet, eager.schedule, ve, GuidanceConfig(scale=0.0), noise="philox")
    x = torch.randn(5, 3, 8, 8)
    for i in (5, 2, 0):
        expected = eager.step(x, i, labels, None, group_ids, seeds)
        got = fused.step(x, i, labels, None, group_ids, seeds)
        torch.testing.assert_close(got, expected, **tolerance(torch.float32, "reduction"))
        if i > 0:  # the guidance moves this step (sigma^2 is tiny at i = 0), so the guided path is checked
            assert (plain.step(x, i, labels, None, group_ids, seeds) - expected).abs().max() > 1e-3


def test_given_noise_and_no_noise(rng_seed):
    eager, fused = make_samplers(TinyUNet(), TinyVE())
    labels = torch.tensor([1, 2, 0])
    x = torch.randn(3, 3, 8, 8)
    noise = torch.randn_like(x)
    for i in (4, 0):
        torch.testing.assert_close(
            fused.step(x, i, labels, noise), eager.step(x, i, labels, noise), **tolerance(torch.float32, "reduction")
        )
        torch.testing.assert_close(
            fused.step(x, i, labels), eager.step(x, i, labels), **tolerance(torch.float32, "reduction")
        )
    assert (fused.step(x, 4, labels, noise) - fused.step(x, 4, labels)).abs().max() > 1e-2


def test_unguided_steps_skip_guidance_and_match(rng_seed, monkeypatch):
    eager, fused = make_samplers(TinyUNet(), TinyVE(), guide_from_step=2, guide_until_step=3)

    def no_guidance(*args, **kwargs):
        raise AssertionError("guidance ran on a step outside the guidance window")

    monkeypatch.setattr(IGDSGuidance, "__call__", no_guidance)  # neither step may guide outside the window
    labels = torch.tensor([1, 2])
    seeds = random_seeds(2)
    x = torch.randn(2, 3, 8, 8)
    for i in (5, 4, 1, 0):  # sampling steps 0, 1, 4, 5: outside the window [2, 3]
        torch.testing.assert_close(
            fused.step(x, i, labels, None, None, seeds),
            eager.step(x, i, labels, None, None, seeds),
            **tolerance(torch.float32, "reduction"),
        )


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_full_sampling_run_matches_eager_philox(rng_seed, learn_sigma):
    # Scale 1 rather than 4: with 6 respaced steps sigma^2 is large, and at scale 4 the guided
    # dynamics of this random VE amplify a 1e-6 per-step difference ~100x over the run (measured:
    # per-step error stays ~1e-6 either way), which would test the toy system, not the kernels.
    unet, ve = TinyUNet(learn_sigma=learn_sigma), TinyVE()
    eager, fused = make_samplers(unet, ve, steps="6", gamma=0.3, scale=1.0)
    labels = [0, 1, 3, 3]
    seeds = random_seeds(4)
    expected = eager.sample(labels, seeds)
    got = fused.sample(labels, seeds)
    torch.testing.assert_close(got, expected, **tolerance(torch.float32, "trajectory"))
    plain = Sampler(unet, eager.schedule, ve, GuidanceConfig(scale=0.0), noise="philox").sample(labels, seeds)
    assert (plain - expected).abs().max() > 1e-2  # the guidance changed the images


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_step_and_run_match_eager(rng_seed, monkeypatch, learn_sigma, eta):
    # The DDIM variant of the update (fused_ddim_update) inside the same step, against the eager DDIM step.
    unet, ve = TinyUNet(learn_sigma=learn_sigma), TinyVE()
    eager, fused = make_samplers(unet, ve, sampler="ddim", eta=eta, gamma=0.3, scale=1.0)
    labels, seeds = torch.tensor([0, 3, 3, 1]), random_seeds(4)
    x = torch.randn(4, 3, 8, 8)
    for i in (5, 2, 0):
        torch.testing.assert_close(fused.step(x, i, labels, None, None, seeds), eager.step(x, i, labels, None, None, seeds),
                                   **tolerance(torch.float32, "reduction"))
    calls = []
    original = fused_step_module.fused_ddim_update

    def recording(*args, seeds=None, noise=None, **kwargs):
        calls.append(seeds is not None or noise is not None)
        return original(*args, seeds=seeds, noise=noise, **kwargs)

    monkeypatch.setattr(fused_step_module, "fused_ddim_update", recording)
    # The whole loop, each step from the eager run's x_t: free-running, this toy's guided dynamics
    # compound the steps' 1e-6 rounding past the trajectory row now and then (2e-4 once in CI-like runs).
    with eager.batch(labels.tolist(), seeds) as by_eager, fused.batch(labels.tolist(), seeds) as by_fused:
        torch.testing.assert_close(by_fused.x, by_eager.x, rtol=0, atol=0)  # the same initial noise
        while by_eager.remaining:
            by_fused.x.copy_(by_eager.x)
            by_eager.step(), by_fused.step()
            torch.testing.assert_close(by_fused.x, by_eager.x, **tolerance(torch.float32, "reduction"))
        got = by_fused.x.clone()
    assert calls == [eta > 0] * 6  # eta 0: no noise read or drawn at any step
    ddpm = make_samplers(unet, ve, gamma=0.3, scale=1.0)[0].sample(labels, seeds)
    assert (ddpm - got).abs().max() > 1e-2  # another update than DDPM's


def test_the_fused_backend_is_named_and_use_kernels_is_its_deprecated_spelling():
    unet, ve = TinyUNet(), TinyVE()
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps="2"))
    assert BACKENDS == ("eager", "fused", "compiled")
    with pytest.warns(DeprecationWarning, match='use_kernels=True.*backend="fused"'):
        old = Sampler(unet, schedule, ve, GuidanceConfig(scale=1.0), use_kernels=True)
    new = Sampler(unet, schedule, ve, GuidanceConfig(scale=1.0), backend="fused")
    assert old.backend == new.backend == "fused" and isinstance(old.stepper, FusedStep)
    assert new.context.noise == "philox"  # drawn in the update kernel
    for stepper in (new.stepper, Sampler(unet, schedule, ve, GuidanceConfig()).stepper):
        assert isinstance(stepper, Stepper) and stepper.batch_size is None and stepper.self_check_report is None
    assert new.self_check_report is None and new.preferred_batch_size is None
    for kwargs, message in [(dict(use_kernels=True, backend="compiled"), "cannot be combined with backend='compiled'"),
                            (dict(backend="fused", noise="torch"), "cannot be used with fused kernels"),
                            (dict(backend="fused", batch_invariant=True), "batch_invariant applies to the eager")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with pytest.raises(IGDSInputError, match=message) as info:
                Sampler(unet, schedule, ve, GuidanceConfig(scale=1.0), **kwargs)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("sampler, eta", [("ddpm", None), ("ddim", 0.5)])
def test_xt_mode_runs_the_kernels_and_matches_eager(rng_seed, sampler, eta):
    """In xt mode the tiny random networks give guidance terms s sigma^2 dJ/dx_t of up to ~1e3 that cancel
    the mean in some elements: the float32 rounding of that term (measured <= 3e-7 of its largest element,
    6 seeds x both samplers x 3 steps) is relative to the term, not to the element it lands in, so the
    reduction tolerance is taken against the guidance term's size. (Elementwise it failed: 2.4e-5 on an
    element of 0.14 beside a term of ~40, seed 897471898.)"""
    unet, ve = TinyUNet(), TinyVE()
    eager, fused = make_samplers(unet, ve, mode="xt", sampler=sampler, eta=eta)
    plain = make_samplers(unet, ve, mode="xt", sampler=sampler, eta=eta, scale=0.0)[0]
    assert type(fused.stepper.ops) is KernelOps  # the Triton head and fused update, autograd through the UNet
    labels = torch.tensor([2, 0])
    seeds = random_seeds(2)
    x = torch.randn(2, 3, 8, 8)
    reduction = tolerance(torch.float32, "reduction")
    rtol, atol = reduction["rtol"], reduction["atol"]
    for i in (5, 3, 0):
        expected = eager.step(x, i, labels, None, None, seeds)
        guidance_term = float((expected - plain.step(x, i, labels, None, None, seeds)).abs().max())
        torch.testing.assert_close(fused.step(x, i, labels, None, None, seeds), expected, rtol=rtol,
                                   atol=atol + rtol * guidance_term)


def test_seed_tensor_built_once_per_batch(monkeypatch):
    _, fused = make_samplers(TinyUNet(), TinyVE())
    step = fused.stepper
    seeds = random_seeds(3)
    x, batch = step.begin_batch(torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2]), seeds)
    first = batch.seeds
    assert torch.is_tensor(first) and first.dtype == torch.int64  # converted once, at the batch's start
    conversions = []
    original = fused_step_module.fused_ddpm_update

    def recording(*args, seeds=None, **kwargs):
        conversions.append(seeds is first)  # every step reads the same device keys
        return original(*args, seeds=seeds, **kwargs)

    monkeypatch.setattr(fused_step_module, "fused_ddpm_update", recording)
    for i in (5, 4, 3):
        x = step.advance(x, i, batch)
    assert conversions == [True, True, True]
    assert torch.equal(step.step_indices[4], torch.tensor(4)) and step.step_indices[4].dim() == 0
    noise = philox_normal(first, 2, (3, 8, 8), "cpu")
    assert torch.equal(noise, philox_normal(seeds, 2, (3, 8, 8), "cpu"))


def test_same_nvtx_ranges_as_eager(rng_seed, monkeypatch):
    import contextlib

    ranges = []

    @contextlib.contextmanager
    def record(name):
        ranges.append(name)
        yield

    monkeypatch.setattr(sampler_module, "nvtx_range", record)
    eager, fused = make_samplers(TinyUNet(), TinyVE())
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    eager.step(x, 3, labels)
    eager_ranges, ranges[:] = list(ranges), []
    fused.step(x, 3, labels)
    assert ranges == eager_ranges == ["igds/unet", "igds/guidance", "igds/update"]


def test_one_step_with_real_variational_estimator(rng_seed):
    ve_module = pytest.importorskip("igds_fast.ve")
    resnet = pytest.importorskip("igds_fast.models.resnet")
    encoder = resnet.build_resnet("resnet18", num_classes=None, softplus_beta=3.0, norm="batch")
    classes, dim = 4, encoder.feature_dim
    ve = ve_module.VariationalEstimator(
        encoder,
        torch.randn(classes, dim) / math.sqrt(dim),
        torch.randn(classes),
        torch.log_softmax(torch.randn(classes, dim), dim=1),
        1.0,
        EncoderPreprocess(32, IMAGENET_MEAN, IMAGENET_STD),
        [f"class{k}" for k in range(classes)],
    )
    eager, fused = make_samplers(TinyUNet(image_size=16), ve, gamma=0.2)
    labels = torch.tensor([0, 3, 3])
    seeds = random_seeds(3)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(
        fused.step(x, 4, labels, None, None, seeds),
        eager.step(x, 4, labels, None, None, seeds),
        **tolerance(torch.float32, "reduction"),
    )


@gpu_only
def test_full_sampling_run_on_gpu(rng_seed):
    unet, ve = TinyUNet(image_size=32).cuda(), TinyVE(resolution=24, dim=64, device="cuda")
    eager, fused = make_samplers(unet, ve, steps="25", device="cuda", gamma=0.3, scale=1.0)
    labels, seeds = [0, 1, 2, 3, 3, 1], random_seeds(6)
    # FusedStep.numerics() keeps PyTorch's defaults, where cuDNN convolutions may round through TF32
    # (~5e-4 per convolution, compounded over 25 steps); the eager reference runs true float32
    # (fp32_reference_math). This test checks the kernels, so the fused run gets the reference's
    # numerics too, and the float32 trajectory tolerance stays the fair one.
    with fp32_reference_math(torch.device("cuda")):
        fused_images = fused.sample(labels, seeds)
    torch.testing.assert_close(fused_images, eager.sample(labels, seeds), **tolerance(torch.float32, "trajectory"))


def test_full_sampling_run_with_real_adm_unet_and_ve(rng_seed):
    # The real architectures, tiny: guided-diffusion's UNet (learned sigma, class-conditional) and
    # a ResNet-18 VariationalEstimator, from the shared test factories.
    factories = pytest.importorskip("factories")
    pytest.importorskip("igds_fast.models.adm")
    unet, ve = factories.tiny_adm(image_size=16), factories.tiny_ve(num_classes=4, resolution=16)
    class_map = [7, 100, 3, 999]  # the VE's 4 classes inside the prior's 1000
    eager, fused = make_samplers(unet, ve, steps="4", prior_class_map=class_map, scale=1.0, beta=0.3)
    labels, seeds = [0, 2, 3], random_seeds(3)
    with torch.no_grad():
        expected = eager.sample(labels, seeds)
        got = fused.sample(labels, seeds)
    torch.testing.assert_close(got, expected, **tolerance(torch.float32, "trajectory"))
    plain = Sampler(unet, eager.schedule, ve, GuidanceConfig(scale=0.0), noise="philox", prior_class_map=class_map)
    assert (plain.sample(labels, seeds) - expected).abs().max() > 1e-3  # the guidance changed the images
