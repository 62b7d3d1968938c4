"""The compiled backend's first-step self-check (igds_fast.sampling.compiled.self_check) against planted numerics faults.

Models: the digits demo's prior architecture (1 channel, 16x16, middle-block attention of 64 channels
in 2 heads of 32) and a 1-channel ResNet-18 VE, random weights. The copies run uncompiled in fp32
(the step's logic at CPU cost) unless a test says otherwise; a fault is planted in the low-precision
copy only, so the float32 reference stays right.

Tolerances (igds_fast.sampling.compiled.self_check.SELF_CHECK_TOLERANCES) come from `bench/self_check.py` (worst of 4
images, 2 for adm256, at the first step; CPU; copies uncompiled unless "inductor"; bench/RESULTS.md):

| model (random weights unless trained)     | dtype | unet    | features | head    | gradient | step    |
|-------------------------------------------|-------|---------|----------|---------|----------|---------|
| tiny ADM 16 px + ResNet-18                | bf16  | 1.6e-2  | 6.0e-3   | 1.1e-6  | 3.0e-2   | 5.7e-8  |
| digits architecture                       | bf16  | 2.1e-2  | 5.0e-3   | 5.1e-7  | 7.2e-2   | 6.5e-8  |
| digits demo, trained prior and VE         | bf16  | 3.5e-3  | 8.6e-3   | 6.1e-6  | 6.9e-2   | 6.5e-8  |
| digits demo, trained, inductor            | bf16  | 3.3e-3  | 8.4e-3   | 6.5e-6  | 5.7e-2   | 6.4e-8  |
| digits demo, trained prior and VE         | fp16  | 4.5e-4  | 1.5e-3   | 7.8e-6  | 1.6e-2   | 6.5e-8  |
| adm256-cond + ResNet-50 at 224 px         | bf16  | 1.2e-2  | 4.7e-3   | 1.3e-8  | 1.8e-1   | 5.2e-8  |

So unet/features: bf16 5e-2 (2.4x the worst seen), fp16 and fp32 1e-2 (fp32 also covers TF32
convolutions on CUDA); head (fp32 Triton vs autograd) 1e-3; step (fp32 elementwise update of the
step's own inputs) 1e-3; gradient 1.0 — input gradients through a low-precision encoder lose much of
their relative accuracy to cancellation (fp16 also to underflow; 18% at ResNet-50 in bf16) while the
sampled images stay right (test_compiled's PSNR floors): that part catches NaN, sign flips and
blow-ups, and a wrong encoder shows in "features". An x_{t-1} from the eager step run from x_t is no
measure of the update at the first step: x0_hat = x_t / sqrt(abar) - sqrt(1/abar - 1) eps amplifies
the UNet's rounding by sqrt(1/abar - 1) there (0.21 relative on the trained digits models in bf16).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from factories import digits_adm, tiny_ve
from igds_fast.sampling import fused as fused_module
from igds_fast.sampling.compiled import step as compiled_module
from igds_fast.guidance import GuidanceConfig
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.errors import IGDSNumericsError
from igds_fast.sampling import Sampler
from igds_fast.sampling.compiled.self_check import (
    SELF_CHECK_TOLERANCES,
    checked_rows,
    compare,
    first_diverging_module,
    relative_errors,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FP32_COPIES = dict(dtype="fp32", compile=False, channels_last=False)
STEPS = "4"


def random_seeds(count):
    return [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(count)]


def digits_models():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return digits_adm(), tiny_ve(num_classes=10, channels=1, resolution=16)


def compiled_sampler(unet, ve, options=None, **guidance):
    schedule = DiffusionSchedule(ScheduleConfig(noise_schedule="cosine", sampling_steps=STEPS))
    config = GuidanceConfig(**{"scale": 1.0, "beta": 0.5, **guidance})
    return Sampler(unet, schedule, ve, config, backend="compiled", backend_options=options or dict(FP32_COPIES),
                   noise="philox")


# ---- the pieces -------------------------------------------------------------------------------------
def test_checked_rows_take_whole_groups_when_the_guidance_couples_them():
    labels = torch.tensor([3, 1, 3, 2, 1, 0, 3, 2])
    assert checked_rows(labels, None, coupled=False).tolist() == [0, 1, 2, 3]
    assert checked_rows(labels[:2], None, coupled=False).tolist() == [0, 1]
    # gamma != 0: groups = labels; class 3 (rows 0, 2, 6) then class 1 (1, 4) reach 4 rows.
    assert checked_rows(labels, None, coupled=True).tolist() == [0, 1, 2, 4, 6]
    groups = torch.tensor([5, 5, 5, 5, 5, 5, 7, 7])
    assert checked_rows(labels, groups, coupled=True).tolist() == [0, 1, 2, 3, 4, 5]  # a big group stays whole


def test_relative_errors_mark_non_finite_and_skip_a_non_finite_reference():
    expected = torch.randn(3, 5)
    actual = expected * torch.tensor([[1.0], [1.1], [1.0]])
    actual[2, 1] = float("nan")
    errors = relative_errors(actual, expected)
    assert errors[0] == 0 and abs(errors[1] - 0.1) < 1e-6 and math.isinf(errors[2])
    result = compare("unet", actual, expected, 0.05)
    assert result["failed"] and result["nonfinite"] == 1 and result["compared"] == 3
    expected[2, 0] = float("inf")  # a non-finite reference image is not the fast path's fault
    result = compare("unet", actual, expected, 0.2)
    assert not result["failed"] and result["compared"] == 2 and abs(result["error"] - 0.1) < 1e-6


def test_first_diverging_module_names_the_innermost_faulty_module():
    torch.manual_seed(0)
    reference = torch.nn.Sequential(
        torch.nn.Linear(6, 6), torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()), torch.nn.Linear(6, 2)
    )
    candidate = torch.nn.Sequential(*[layer for layer in reference])  # same modules, same names
    x = torch.randn(4, 6)
    assert first_diverging_module(reference, candidate, lambda: reference(x), lambda: candidate(x), 1e-6) is None
    import copy

    faulty = copy.deepcopy(reference)
    faulty[1][0].register_forward_hook(lambda module, inputs, output: output * 1.1)
    found = first_diverging_module(reference, faulty, lambda: reference(x), lambda: faulty(x), 0.05)
    assert found[:2] == ("1.0", "Linear") and found[2].startswith("relative error 0.1")
    faulty[1][0].register_forward_hook(lambda module, inputs, output: output * float("nan"))
    found = first_diverging_module(reference, faulty, lambda: reference(x), lambda: faulty(x), 0.05)
    assert found == ("1.0", "Linear", "non-finite output")


def test_the_tolerance_table_covers_every_dtype_and_part():
    for dtype in compiled_module.DTYPES:
        assert set(SELF_CHECK_TOLERANCES[dtype]) == {"unet", "decoder", "features", "head", "gradient", "step"}
    assert SELF_CHECK_TOLERANCES["bf16"]["unet"] < 0.1  # an output off by 10% must fail in every dtype
    assert all(parts["features"] < 0.1 and parts["unet"] < 0.1 for parts in SELF_CHECK_TOLERANCES.values())


# ---- planted faults: each stops the run at the first step with one line -----------------------------
def scale_output(module, factor):
    module.register_forward_hook(lambda m, inputs, output: output * factor)


FAULTS = {
    # name: (plant(step), message pattern)
    "unet-nan": (lambda step: scale_output(step.unet_lp.unet.middle_block[1], float("nan")),
                 r"in the UNet copy \(fp32\): UNet output non-finite in \d of \d .*module 'middle_block\.1' \(AttentionBlock\): "
                 r"non-finite output in the uncompiled fp32 copy"),
    "unet-10%": (lambda step: scale_output(step.unet_lp.unet.out, 1.1),
                 r"UNet output off by 0\.1\d* relative L2 .*module 'out(\.2)?'"),
    "encoder-nan": (lambda step: scale_output(step.features_lp.encoder.layer3, float("nan")),
                    r"in the VE encoder copy \(fp32\): encoder features non-finite .*encoder module 'layer3' \(Sequential\)"),
    "encoder-10%": (lambda step: scale_output(step.features_lp.encoder.layer4, 1.1),
                    r"encoder features off by 0\.1\d* .*encoder module 'layer4' \(Sequential\)"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_planted_fault_stops_the_run_at_the_first_step_in_one_line(fault):
    unet, ve = digits_models()
    sampler = compiled_sampler(unet, ve)
    plant, pattern = FAULTS[fault]
    plant(sampler.stepper)
    with pytest.raises(IGDSNumericsError, match=pattern) as caught:
        sampler.sample([0, 3, 7, 9], random_seeds(4))
    message = str(caught.value)
    assert "\n" not in message and f"respaced index {int(STEPS) - 1}" in message, message


def test_a_failed_self_check_is_reported_once():
    # After the one-line error the check is done: a later call does not run (and fail) it again.
    unet, ve = digits_models()
    sampler = compiled_sampler(unet, ve)
    scale_output(sampler.stepper.unet_lp.unet.out, 1.1)
    with pytest.raises(IGDSNumericsError, match="UNet output off by"):
        sampler.sample([0, 3], random_seeds(2))
    reference_calls = []
    unet.register_forward_hook(lambda module, inputs, output: reference_calls.append(inputs[0].shape[0]))
    images = sampler.sample([0, 3], random_seeds(2))
    assert reference_calls == [] and images.shape == (2, 1, 16, 16) and sampler.self_check_report is None


def test_a_faulty_head_or_update_kernel_is_named(monkeypatch):
    unet, ve = digits_models()
    original_head = fused_module.guidance_head
    monkeypatch.setattr(fused_module, "guidance_head",
                        lambda *args: tuple(t * 1.1 for t in original_head(*args)))
    with pytest.raises(IGDSNumericsError, match=r"self-check failed .* in the Triton guidance head: dJ/dz"):
        compiled_sampler(unet, ve).sample([1, 2], random_seeds(2))
    monkeypatch.setattr(fused_module, "guidance_head", original_head)
    original_update = fused_module.fused_ddpm_update

    def off_update(*args, **kwargs):
        return original_update(*args, **kwargs).mul_(1.01)

    monkeypatch.setattr(fused_module, "fused_ddpm_update", off_update)
    with pytest.raises(IGDSNumericsError, match=r"in the fused DDPM update kernel: x_\(t-1\) off by"):
        compiled_sampler(unet, ve).sample([1, 2], random_seeds(2))


def test_a_compile_only_fault_is_blamed_on_torch_compile(monkeypatch):
    # The compiled UNet returns NaN where its uncompiled copy is right: what the bf16 inductor fault
    # on an Intel CPU looked like. (aot_eager compiles; the fault is planted in the compiled callable.)
    unet, ve = digits_models()
    sampler = compiled_sampler(unet, ve, dict(FP32_COPIES, compile=True, backend="aot_eager", compile_encoder=False))
    step = sampler.stepper
    compiled_unet = step.ops.unet_fn
    step.ops.unet_fn = lambda *args: compiled_unet(*args) * float("nan")
    with pytest.raises(IGDSNumericsError, match=r"uncompiled fp32 copy agrees: a torch\.compile fault"):
        sampler.sample([4, 5], random_seeds(2))


def test_a_correct_run_pays_one_reference_step_per_run_not_per_batch():
    unet, ve = digits_models()
    reference_calls = []
    sampler = compiled_sampler(unet, ve, gamma=0.3)
    off = compiled_sampler(unet, ve, dict(FP32_COPIES, self_check=False))
    # On the user's float32 UNet, after the copies were made (a deep copy would take the hook along).
    unet.register_forward_hook(lambda module, inputs, output: reference_calls.append(inputs[0].shape[0]))
    sampler.sample([0, 0, 1, 1, 2, 2], random_seeds(6), pad_to=8)
    report = sampler.self_check_report
    assert report["index"] == int(STEPS) - 1 and report["images"] == 4  # classes 0 and 1: two whole groups
    assert [part["part"] for part in report["parts"]] == ["unet", "features", "head", "gradient", "step"]
    assert not any(part["failed"] for part in report["parts"])
    assert all(part["error"] < 1e-4 for part in report["parts"] if part["part"] != "gradient")
    assert reference_calls == [4]  # the float32 UNet ran once, on the checked images
    sampler.sample([3, 4], random_seeds(2))
    sampler.sample([5, 6, 7, 8], random_seeds(4))
    assert reference_calls == [4]  # later batches: no more reference work
    off.sample([1, 2], random_seeds(2))
    assert reference_calls == [4] and off.self_check_report is None


def test_bf16_copies_of_the_digits_architecture_pass_their_own_check():
    unet, ve = digits_models()
    sampler = compiled_sampler(unet, ve, dict(dtype="bf16", compile=False, channels_last=True), mode="xt")
    sampler.sample([2, 5, 8], random_seeds(3))
    parts = {part["part"]: part for part in sampler.self_check_report["parts"]}
    assert 1e-4 < parts["unet"]["error"] <= SELF_CHECK_TOLERANCES["bf16"]["unet"]  # really bf16, and within
    assert parts["step"]["error"] <= SELF_CHECK_TOLERANCES["bf16"]["step"]
