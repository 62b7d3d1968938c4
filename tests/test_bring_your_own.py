"""Bring your own models: guided-diffusion's own UNetModel and a third-party encoder through `Sampler`.

The UNetModel (the original code, guided-diffusion-sdk) and our ADMUNet hold the same weights (the
checkpoint layouts are key for key), so the sampler must give the same images with either; the
third-party encoder is a plain module that only satisfies `models.protocols.GuidanceEstimator`.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from factories import randomize_
from igds_fast import DiffusionSchedule, GuidanceConfig, Sampler, ScheduleConfig
from igds_fast.errors import IGDSInputError
from igds_fast.models.adm import ADMUNet
from igds_fast.models.protocols import ForeignUNet, GuidanceEstimator, PriorUNet, as_prior

script_util = pytest.importorskip("guided_diffusion.script_util")

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
             class_cond=True, attention_resolutions="8", num_head_channels=16, use_scale_shift_norm=True,
             resblock_updown=True)
PRIOR_MAP = [3, 17, 250, 999]


class ProjectionEncoder(nn.Module):
    """A third-party estimator: no igds_fast class, only what the steps call (features, head tensors)."""

    def __init__(self, classes=4, dim=24):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8 * 8 * 8, dim)
        self.register_buffer("weight", torch.randn(classes, dim) * 2 / math.sqrt(dim))
        self.register_buffer("bias", torch.randn(classes))
        self.register_buffer("log_centroids", torch.log_softmax(torch.randn(classes, dim) * 2, dim=1))
        self.tau, self.num_classes = 0.8, classes

    def features(self, x):
        return F.softplus(self.proj(F.silu(self.conv(x)).flatten(1)), beta=3.0)


def random_seeds(count):
    return [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(count)]


@pytest.fixture(scope="module")
def models():
    with torch.random.fork_rng():
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        theirs = randomize_(script_util.create_model(**FLAGS), 0.05).eval()
        ours = ADMUNet.from_flags(**FLAGS).eval()
        ours.load_state_dict(theirs.state_dict())
        encoder = ProjectionEncoder().eval()
    return theirs, ours, encoder


def sampler(unet, encoder, **kwargs):
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps="5"))
    return Sampler(unet, schedule, encoder, GuidanceConfig(scale=2.0, beta=0.5), prior_class_map=PRIOR_MAP, **kwargs)


def test_the_models_satisfy_the_protocols(models):
    theirs, ours, encoder = models
    assert not isinstance(theirs, PriorUNet)  # no learn_sigma: adapted
    adapted = as_prior(theirs)
    assert isinstance(adapted, ForeignUNet) and isinstance(adapted, PriorUNet)
    assert adapted.learn_sigma and adapted.image_size == 16 and adapted.num_classes == 1000
    assert as_prior(ours) is ours and isinstance(encoder, GuidanceEstimator)


def test_guided_diffusions_unet_samples_like_ours(models):
    theirs, ours, encoder = models
    labels, seeds = [0, 3, 1], random_seeds(3)
    expected = sampler(ours, encoder).sample(labels, seeds)
    actual = sampler(theirs, encoder).sample(labels, seeds)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    dict(dtype="fp32", backend="aot_eager", channels_last=False),  # compiled, float32
    dict(dtype="bf16", compile=False, channels_last=False),  # its own use_fp16 convention, in bf16
])
def test_guided_diffusions_unet_and_a_foreign_encoder_on_the_compiled_backend(models, options):
    theirs, _, encoder = models
    labels, seeds = [2, 0], random_seeds(2)
    expected = sampler(theirs, encoder, noise="philox").sample(labels, seeds)
    compiled = sampler(theirs, encoder, backend="compiled", backend_options=options)
    actual = compiled.sample(labels, seeds)
    step = compiled.stepper
    assert not any(part["failed"] for part in step.self_check_report["parts"])
    if options["dtype"] == "bf16":
        convs = [m for m in step.unet_lp.modules() if isinstance(m, nn.Conv2d)]
        norms = [m for m in step.unet_lp.modules() if isinstance(m, nn.GroupNorm)]
        assert {m.weight.dtype for m in convs} == {torch.bfloat16} and {m.weight.dtype for m in norms} == {torch.float32}
        assert step.unet_lp.unet.unet.dtype == torch.bfloat16  # its own input cast follows the copy
        assert (actual - expected).abs().max() < 0.1
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_what_is_missing_is_named_in_one_line(models):
    theirs, ours, encoder = models

    class NoCentroids:
        weight, bias, tau, num_classes = encoder.weight, encoder.bias, 0.8, 4

        def features(self, x):
            return encoder.features(x)

    with pytest.raises(IGDSInputError, match="lacks log_centroids") as info:
        sampler(ours, NoCentroids())
    assert "\n" not in str(info.value)
    with pytest.raises(IGDSInputError, match="no 'in_channels' attribute"):
        sampler(lambda x, t, y=None: x, encoder)
    with pytest.raises(IGDSInputError, match="no 'image_size' attribute: pass image_size="):
        as_prior(nn.Conv2d(3, 6, 1))
    wrapped = as_prior(nn.Conv2d(3, 6, 1), image_size=8, num_classes=None)
    assert wrapped.learn_sigma and wrapped.num_classes is None
