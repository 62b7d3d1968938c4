"""Sampler.sample's hooks: a given x_T, a per-step callback (diffusers' callback_on_step_end style) and the
trace of the guidance terms, on the eager, kernel and compiled backends."""
from __future__ import annotations

import math
import os

import pytest
import torch

from factories import tiny_adm, tiny_ve
from host_reads import SyncingOpRecorder, host_reads
from igds_fast import DiffusionSchedule, GuidanceConfig, Sampler, ScheduleConfig
from igds_fast.errors import IGDSInputError
from igds_fast.sampling.step import TRACE_TERMS

pytestmark = pytest.mark.usefixtures("one_thread")

PRIOR_MAP = [3, 17, 250, 999]
STEPS = "5"
FP32_COPIES = dict(dtype="fp32", compile=False, channels_last=False, self_check=False)


def random_seeds(count):
    return [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(count)]


@pytest.fixture(scope="module")
def models():
    with torch.random.fork_rng():
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        return tiny_adm(image_size=16), tiny_ve(num_classes=4, resolution=16)


def make(models, **kwargs):
    unet, ve = models
    guidance = GuidanceConfig(scale=2.0, beta=0.5, gamma=kwargs.pop("gamma", 0.3),
                              guide_until_step=kwargs.pop("guide_until_step", None))
    return Sampler(unet, DiffusionSchedule(ScheduleConfig(sampling_steps=STEPS)), ve, guidance,
                   prior_class_map=PRIOR_MAP, **kwargs)


def test_a_given_x_T_is_where_sampling_starts(models):
    sampler = make(models)
    labels, seeds = [0, 2, 3], random_seeds(3)
    x_T = sampler.noise_source(seeds, -1, (3, 16, 16), "cpu")
    torch.testing.assert_close(sampler.sample(labels, seeds, x_T=x_T), sampler.sample(labels, seeds), rtol=0, atol=0)
    other = sampler.sample(labels, seeds, x_T=torch.randn_like(x_T))
    assert (other - sampler.sample(labels, seeds)).abs().max() > 1e-2
    padded = sampler.sample(labels, seeds, x_T=x_T, pad_to=4)
    assert padded.shape == (3, 3, 16, 16)
    with pytest.raises(IGDSInputError, match=r"x_T must be a tensor of shape \(3, 3, 16, 16\)"):
        sampler.sample(labels, seeds, x_T=x_T[:2])


def test_the_callback_sees_every_step_and_may_replace_x(models):
    sampler = make(models)
    labels, seeds = [1, 3], random_seeds(2)
    seen = []

    def record(i, timestep, x, x0):
        seen.append((i, timestep, x.clone(), x0.clone()))

    plain = sampler.sample(labels, seeds)
    torch.testing.assert_close(sampler.sample(labels, seeds, callback=record), plain, rtol=0, atol=0)
    assert [s[0] for s in seen] == [4, 3, 2, 1, 0]
    assert [s[1] for s in seen] == sampler.schedule.timestep_map.tolist()[::-1]
    torch.testing.assert_close(seen[-1][2].clamp(-1, 1), plain, rtol=0, atol=0)  # x after the last step
    assert all(s[3].abs().max() <= 1 for s in seen)  # clipped x0 predictions
    replaced = sampler.sample(labels, seeds, callback=lambda i, t, x, x0: torch.zeros_like(x) if i == 2 else None)
    assert (replaced - plain).abs().max() > 1e-2
    with pytest.raises(IGDSInputError, match="must return None or a tensor"):
        sampler.sample(labels, seeds, callback=lambda i, t, x, x0: x[:1])


@pytest.mark.parametrize("backend", ["eager", "fused", "compiled"])
def test_the_trace_holds_the_guidance_terms_of_every_guided_step(models, backend):
    options = {"eager": {}, "fused": {"backend": "fused"},
               "compiled": {"backend": "compiled", "backend_options": FP32_COPIES}}[backend]
    sampler = make(models, noise="philox", guide_until_step=3, **options)  # step 4 (i = 0) unguided
    labels, seeds = [0, 0, 2], random_seeds(3)
    x0s = {}
    images, trace = sampler.sample(labels, seeds, trace=True, callback=lambda i, t, x, x0: x0s.update({i: x0.clone()}))
    assert set(trace) == set(TRACE_TERMS) and all(v.shape == (5, 3) for v in trace.values())
    assert torch.isnan(trace["kl"][0]).all() and torch.isfinite(trace["kl"][1:]).all()  # i = 0 is not guided
    labels_t = torch.tensor(labels)
    guidance = sampler.guidance_fn
    for i in (4, 2, 1):
        with torch.no_grad():
            z = sampler.ve.features(x0s[i])
        expected = guidance.terms(z, labels_t, labels_t)  # gamma 0.3: the groups are the labels
        for k, name in enumerate(("log_p_y", "kl", "infonce", "top1")):
            torch.testing.assert_close(trace[name][i], expected[:, k], rtol=1e-4, atol=1e-4)
    assert (trace["grad_norm"][1:] > 0).all() and (trace["kl"][1:] >= 0).all() and (trace["log_p_y"][1:] <= 0).all()
    assert set(trace["top1"][1:].unique().tolist()) <= {0.0, 1.0}
    assert not math.isnan(float(trace["infonce"][4, 0]))  # the two class-0 images form a group


def test_the_traced_compiled_loop_reads_nothing_back_to_the_host(models, monkeypatch):
    sampler = make(models, backend="compiled", backend_options=FP32_COPIES)
    labels, seeds = torch.tensor([0, 1, 1]), random_seeds(3)
    with sampler.batch(labels, seeds, labels, trace=True) as run:
        calls = host_reads(monkeypatch)
        with SyncingOpRecorder(calls):
            while run.remaining:  # the loop of Sampler.sample: i = 4 .. 0
                run.step()
        assert calls == [], f"host reads inside the traced loop: {sorted(set(calls))}"
        monkeypatch.undo()
        run.finish()
    assert torch.isfinite(run.read_trace()["kl"]).all()
