"""What the sampler loop does once per batch, not once per step (issue 12's hot-path defects).

Each test fails on the code before the redesign: the eager and fused steps read the finite check
back to the host at every guided step; the eager Philox path copied the seed list to the device
and re-gathered the class map every step; the preprocessing rebuilt its resize matrices and
statistics casts every call; the compiled step's direct calls reused stale static buffers when
labels were edited in place. CompiledStep also set cudnn.benchmark for the whole process — on CUDA
only, so the last test guards the scoped replacement here but shows the old leak only on a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from factories import tiny_adm, tiny_ve
from host_reads import SyncingOpRecorder, host_reads
from igds_fast import preprocess as preprocess_module
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.guidance import GuidanceConfig
from igds_fast.preprocess import EncoderPreprocess
from igds_fast.sampling import Sampler, backends, step as step_module

pytestmark = pytest.mark.usefixtures("one_thread")

PRIOR_MAP = [3, 17, 250, 999]
STEPS = "4"


def random_seeds(count):
    return [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(count)]


@pytest.fixture(scope="module")
def models():
    return tiny_adm(image_size=16), tiny_ve(num_classes=4, resolution=16)


def make(models, **kwargs):
    unet, ve = models
    guidance = GuidanceConfig(scale=1.0, beta=0.5, gamma=kwargs.pop("gamma", 0.0))
    return Sampler(unet, DiffusionSchedule(ScheduleConfig(sampling_steps=STEPS)), ve, guidance,
                   prior_class_map=PRIOR_MAP, **kwargs)


@pytest.mark.parametrize("kind", ["eager", "eager-philox", "fused", "batch-invariant"])
def test_the_loop_reads_the_host_once_per_batch(models, kind, monkeypatch):
    options = {"eager": {}, "eager-philox": {"noise": "philox"}, "fused": {"backend": "fused"},
               "batch-invariant": {"batch_invariant": True}}[kind]
    sampler = make(models, **options)
    labels, seeds = torch.tensor([0, 1, 3]), random_seeds(3)
    with sampler.batch(labels, seeds) as run:  # batch-invariant: its parts, found here once
        calls = host_reads(monkeypatch)
        with SyncingOpRecorder(calls):
            while run.remaining:  # the loop of Sampler.sample; every step guided
                run.step()
        assert calls == [], f"host reads inside the loop: {sorted(set(calls))}"
        run.finish()  # the batch's one read of its finite check
    assert calls and set(calls) <= {"item", "__bool__", "tolist", "__index__", "__int__", "aten._local_scalar_dense"}


def test_philox_keys_and_prior_labels_are_built_once_per_batch(models, monkeypatch):
    sampler = make(models, noise="philox")
    keys, gathers = [], []
    original_keys = sampler.context.noise_keys
    monkeypatch.setattr(sampler.context, "noise_keys", lambda *args: keys.append(1) or original_keys(*args))
    original_gather = step_module.StepContext.prior_labels
    monkeypatch.setattr(step_module.StepContext, "prior_labels",
                        lambda self, labels: gathers.append(1) or original_gather(self, labels))
    sampler.sample([0, 2], random_seeds(2))
    assert keys == [1] and gathers == [1]  # one batch, four steps
    sampler.sample([1, 3], random_seeds(2))
    assert keys == [1, 1] and gathers == [1, 1]
    assert backends.resolve_noise_source("philox")[1] is not None


def test_preprocessing_builds_its_matrices_and_statistics_once(monkeypatch):
    pre = EncoderPreprocess(14, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    monkeypatch.setattr(preprocess_module, "_resize_by_matmul", lambda x: True)  # the CUDA route, on CPU
    built = []
    original = preprocess_module.bilinear_matrix
    monkeypatch.setattr(preprocess_module, "bilinear_matrix", lambda *args: built.append(args[:2]) or original(*args))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    first = pre(x)
    for _ in range(3):
        torch.testing.assert_close(pre(x), first, rtol=0, atol=0)
    assert built == [(16, 14)]  # square input: one matrix, built once
    pre(torch.rand(2, 3, 16, 20) * 2 - 1)
    assert built == [(16, 14), (20, 14)]
    mean = pre._cached(("mean", x.device, x.dtype), lambda: None)
    assert mean is pre._cached(("mean", x.device, x.dtype), lambda: None) and mean.dtype == torch.float32
    pre.double()  # moving the module drops what was cached for the old tensors
    assert pre._cache == {}


def test_compiled_direct_steps_see_labels_edited_in_place(models):
    unet, ve = models
    options = dict(dtype="fp32", compile=False, channels_last=False, self_check=False)
    sampler = make(models, backend="compiled", backend_options=options)
    reference = make(models, noise="philox")
    labels, seeds = torch.tensor([0, 1]), random_seeds(2)
    x = torch.randn(2, 3, 16, 16)
    sampler.step(x, 2, labels, None, None, seeds)
    labels[0] = 3  # the same tensor object, new values
    actual = sampler.step(x, 2, labels, None, None, seeds).clone()
    expected = reference.step(x, 2, labels, None, None, seeds)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_the_compiled_backend_leaves_cudnn_benchmark_as_it_found_it(models):
    from igds_fast.sampling.compiled.step import _cudnn_benchmark

    before = torch.backends.cudnn.benchmark
    make(models, backend="compiled", backend_options=dict(dtype="fp32", compile=False, channels_last=False))
    assert torch.backends.cudnn.benchmark == before
    with _cudnn_benchmark(True):
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
