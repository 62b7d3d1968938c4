"""The compiled backend (igds_fast.sampling.compiled) against the float32 eager reference.

Both samplers use Philox noise (`noise="philox"`), so they see identical x_T and identical step noise;
what differs is only the arithmetic: low-precision UNet/encoder copies, torch.compile, Triton x0 /
head / update kernels, and on a GPU the CUDA-graph replay. Two measurements:

  teacher-forced  at every step i both steps start from the SAME eager x_i: the relative L2 error
                  ||a - b|| / ||b|| of the UNet output and of x_{i-1} measures one step's error alone.
  free-running    whole runs from x_T: PSNR of the final images (range [-1, 1], peak-to-peak 2) and the
                  VE classifier's argmax agreement on them.

Tolerances (why):

| comparison            | fp32 compiled | bf16 (CPU, tiny) | bf16 (GPU, mid-size ADM) |
|-----------------------|---------------|------------------|--------------------------|
| per-step UNet rel L2  | 1e-4          | 1.5e-2           | 2e-2                     |
| per-step x_{t-1} rel  | 1e-4          | 1.5e-2           | 2e-2                     |
| final PSNR (dB) >=    | 80            | 35               | 30                       |
| VE agreement >=       | 1.0           | 0.75             | 0.9                      |

* fp32: the same math in another order (inductor/dynamo graphs, the Triton head vs autograd, fused
  update): ~1e-6 measured per step, bounded like tests/tolerances.py's fp32 "trajectory" (1e-4).
  80 dB = an RMS image difference of 2e-4, far above the ~1e-6 seen and far below any visible change.
* bf16: 8 significant bits, unit roundoff 2^-9 = 2e-3 per rounding; the UNet output sums many
  rounded layers (measured 4e-3 on the tiny ADM, depth ~20 layers); error grows ~sqrt(depth), so 2e-2
  covers a few-times-deeper ADM with margin. x_{t-1} inherits eps's error scaled by sqrt(1-abar)/sqrt(abar)
  * coef1 < 1 plus the bf16 encoder's guidance error times s*sigma^2 (measured <= 5.5e-3 on the tiny run).
* final images: random-weight priors amplify per-step differences over a run (the guided dynamics are
  chaotic in places, test_fused_step notes ~100x at scale 4), so the image floors are set with margin on
  measured values (tiny bf16, 6-20 steps: 45-50 dB) and the VE agreement is a fraction (a random VE's
  argmax can sit near a tie). These numbers are NOT the acceptance numbers of real checkpoints.

CPU: the compile path runs without graphs. One module-level sampler is compiled with backend
"aot_eager" (dynamo full-graph capture + AOTAutograd, incl. the encoder's compiled input-gradient
backward, without inductor's C++ code generation — a cold inductor compile of UNet + encoder costs ~2
minutes on 2 shared cores); one test compiles a smaller ADM's UNet with inductor proper. CUDA-graph
tests are GPU-only (`-m gpu`, IGDS_TEST_GPU=1) and skip cleanly on CPU.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from factories import digits_adm, randomize_, tiny_adm, tiny_ve
from host_reads import SyncingOpRecorder, host_reads
from igds_fast.sampling.compiled import (
    ATTENTION_IMPLEMENTATIONS,
    AUTOTUNE_INDUCTOR_OPTIONS,
    CONV_UNET_INDUCTOR_OPTIONS,
    CompileConfig,
    CompiledStep,
    choose_batch_size,
    estimate_step_memory,
    faster_attention,
    graphs_per_batch_shape,
    low_precision_copy,
    probe_step_bytes,
    set_attention,
    traces_in_one_graph,
    xformers_available,
)
from igds_fast.guidance import GuidanceConfig
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig
from igds_fast.errors import IGDSInputError
from igds_fast.kernels import philox_normal
from igds_fast.models.adm import AttentionBlock
from igds_fast.sampling import Sampler, Stepper
from igds_fast.seeding import INITIAL_NOISE_STREAM

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
gpu = pytest.mark.gpu
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU with compiled Triton (IGDS_TEST_GPU=1)")

# (per-step UNet rel L2, per-step x_{t-1} rel L2, final PSNR floor dB, VE agreement floor)
TOLERANCES = {
    "fp32": (1e-4, 1e-4, 80.0, 1.0),
    "bf16-cpu": (1.5e-2, 1.5e-2, 35.0, 0.75),
    "bf16-gpu": (2e-2, 2e-2, 30.0, 0.9),
}
NUM_CLASSES = 4
# The compiled step without torch.compile, in fp32 and NCHW: the CPU-cheap way to test the step logic
# (bf16 and channels_last convolutions are 10-20x slower than fp32 NCHW on these CPUs at these sizes).
FP32_EAGER_COPIES = dict(dtype="fp32", compile=False, channels_last=False)


# ---- helpers ------------------------------------------------------------------------------------
def random_seeds(count):
    return [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(count)]


def build_models(device="cpu", seed=None, **adm_flags):
    """A random tiny ADM (16x16 unless overridden) and a ResNet-18 VE, from a recorded seed."""
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        size = adm_flags.pop("image_size", 16)
        unet = tiny_adm(image_size=size, **adm_flags).to(device)
        ve = tiny_ve(num_classes=NUM_CLASSES, resolution=min(size, 32)).to(device)
        class_map = torch.randperm(1000)[:NUM_CLASSES].tolist()
    return unet, ve, class_map, seed


def make_pair(unet, ve, class_map, options, steps="6", device="cpu", **guidance):
    """(eager fp32 sampler, compiled sampler) on one schedule, both with Philox noise."""
    schedule = DiffusionSchedule(ScheduleConfig(sampling_steps=steps), device=device)
    config = GuidanceConfig(**{"scale": 1.0, "beta": 0.5, **guidance})
    eager = Sampler(unet, schedule, ve, config, noise="philox", prior_class_map=class_map)
    compiled = Sampler(
        unet, schedule, ve, config, backend="compiled", backend_options=options, noise="philox",
        prior_class_map=class_map,
    )
    assert isinstance(compiled.stepper, CompiledStep)
    return eager, compiled


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def psnr(actual, expected) -> float:
    mse = ((actual.double() - expected.double()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def ve_agreement(ve, actual, expected) -> float:
    with torch.no_grad():
        return (ve(actual).argmax(1) == ve(expected).argmax(1)).double().mean().item()


def teacher_forced_errors(eager, compiled, labels, seeds, group_ids=None):
    """[(i, UNet output rel error, x_{i-1} rel error)] along the eager trajectory."""
    schedule = eager.schedule
    batch = labels.shape[0]
    x = philox_normal(seeds, INITIAL_NOISE_STREAM, (eager.channels, eager.image_size, eager.image_size), eager.device)
    step = compiled.stepper
    errors = []
    for i in reversed(range(schedule.num_steps)):
        with torch.no_grad():
            expected_output = eager.unet(x, schedule.timestep_map[i].expand(batch), eager.prior_labels(labels))
        expected = eager.step(x, i, labels, None, group_ids, seeds)
        actual = compiled.step(x, i, labels, None, group_ids, seeds).clone()
        errors.append((i, relative_error(step.last_model_output, expected_output), relative_error(actual, expected)))
        x = expected
    return errors


def check_fidelity(eager, compiled, ve, tolerances, labels, seeds, group_ids=None):
    unet_tol, x_tol, psnr_floor, agreement_floor = tolerances
    errors = teacher_forced_errors(eager, compiled, labels, seeds, group_ids)
    worst_unet = max(e[1] for e in errors)
    worst_x = max(e[2] for e in errors)
    assert worst_unet <= unet_tol, f"per-step UNet output error {worst_unet:.2e} > {unet_tol:.0e}: {errors}"
    assert worst_x <= x_tol, f"per-step x_(t-1) error {worst_x:.2e} > {x_tol:.0e}: {errors}"
    expected = eager.sample(labels, seeds, group_ids)
    actual = compiled.sample(labels, seeds, group_ids)
    quality = psnr(actual, expected)
    assert quality >= psnr_floor, f"final images PSNR {quality:.1f} dB < {psnr_floor} dB"
    agreement = ve_agreement(ve, actual, expected)
    assert agreement >= agreement_floor, f"VE argmax agreement {agreement:.2f} < {agreement_floor}"
    return {"unet": worst_unet, "x": worst_x, "psnr": quality, "agreement": agreement}


# ---- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dtype="int8"), "dtype"),
        (dict(encoder_dtype="half"), "encoder_dtype"),
        (dict(channels_last=1), "channels_last"),
        (dict(backend="eager"), "backend"),
        (dict(mode="reduce-overhead"), "mode"),
        (dict(inductor_options=["conv_1x1_as_mm"]), "inductor_options"),
        (dict(backend="aot_eager", inductor_options={"epilogue_fusion": True}), "inductor_options"),
        (dict(attention="flash"), "attention"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=True), "batch_size"),
        (dict(memory_fraction=1.5), "memory_fraction"),
        (dict(warmup_iterations=0), "warmup_iterations"),
        (dict(unknown_option=1), "unknown compile options"),
    ],
)
def test_config_rejects_bad_options_in_one_line(options, message):
    with pytest.raises(IGDSInputError, match=message) as info:
        CompileConfig.from_options(options)
    assert "\n" not in str(info.value)


def test_config_device_defaults_and_compile_arguments():
    cpu = CompileConfig().for_device("cpu")
    assert cpu.cuda_graphs is False and cpu.mode == "default" and cpu.inductor_options == {}
    assert cpu.encoder_dtype == "bf16" and cpu.attention == "auto"
    # The CUDA default compiles in minutes: mode "default", no tuning, only the free 1x1-conv flag.
    cuda = CompileConfig().for_device("cuda")
    assert cuda.cuda_graphs is True and cuda.mode == "default"
    assert cuda.inductor_options == CONV_UNET_INDUCTOR_OPTIONS == {"conv_1x1_as_mm": True}
    kwargs = cuda.compile_kwargs()
    assert kwargs["fullgraph"] and kwargs["dynamic"] is False and "mode" not in kwargs
    options = kwargs["options"]
    assert options["conv_1x1_as_mm"] and options["triton.cudagraphs"] is False
    assert not options.get("max_autotune") and not options.get("coordinate_descent_tuning")
    # max-autotune is one flag away (--compile-mode), with the conv-UNet tuning recipe on top.
    tuned = CompileConfig(mode="max-autotune-no-cudagraphs").for_device("cuda")
    assert tuned.inductor_options == {**CONV_UNET_INDUCTOR_OPTIONS, **AUTOTUNE_INDUCTOR_OPTIONS}
    options = tuned.compile_kwargs()["options"]
    assert options["max_autotune"] and options["coordinate_descent_tuning"] and options["epilogue_fusion"] is False
    assert options["triton.cudagraphs"] is False
    assert CompileConfig(mode="max-autotune-no-cudagraphs", inductor_options={}).for_device("cuda").inductor_options == {}
    assert CompileConfig(backend="aot_eager").for_device("cuda").compile_kwargs() == dict(
        backend="aot_eager", fullgraph=True, dynamic=False
    )
    assert CompileConfig(cuda_graphs=False, encoder_dtype="fp32").for_device("cuda").cuda_graphs is False
    assert CompileConfig.from_options(cuda) is cuda


def test_an_optional_piece_that_fails_to_build_is_named_in_one_line(monkeypatch):
    # What a broken xformers install looks like to the step: its attention choice raises a library error.
    from igds_fast.sampling.compiled import step as compiled_module

    def broken_attention(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device\nCUDA details follow")

    monkeypatch.setattr(compiled_module, "resolve_attention", broken_attention)
    unet, ve, class_map, _ = build_models()
    with pytest.raises(IGDSInputError) as info:
        make_pair(unet, ve, class_map, dict(compile=False, attention="xformers"))
    assert str(info.value) == ("the compiled backend could not build its attention 'xformers': RuntimeError: "
                               "no kernel image is available for execution on the device")


def test_sampler_passes_options_and_refuses_xformers_when_missing():
    unet, ve, class_map, _ = build_models()
    _, compiled = make_pair(unet, ve, class_map, dict(compile=False, dtype="fp32", attention="auto"))
    assert compiled.stepper.attention == "sdpa"  # auto never picks xformers on CPU
    if not xformers_available():
        with pytest.raises(IGDSInputError, match="xformers"):
            make_pair(unet, ve, class_map, dict(compile=False, attention="xformers"))


@pytest.mark.parametrize("xformers_ms, expected", [(3.0, "xformers"), (5.0, "sdpa"), (4.0, "sdpa")])
def test_auto_attention_keeps_the_faster_measured_implementation(xformers_ms, expected):
    unet = tiny_adm()
    blocks = [m for m in unet.modules() if hasattr(m, "legacy_order")]
    assert blocks
    timed = []

    def forward_ms():  # what the timer sees installed, and a time per implementation
        installed = {block._attention.__func__ for block in blocks}
        assert len(installed) == 1
        name = {impl: key for key, impl in ATTENTION_IMPLEMENTATIONS.items()}[installed.pop()]
        timed.append(name)
        return {"sdpa": 4.0, "xformers": xformers_ms}[name]

    assert faster_attention(unet, forward_ms) == expected
    assert timed == ["sdpa", "xformers"]
    assert all(block._attention.__func__ is ATTENTION_IMPLEMENTATIONS[expected] for block in blocks)


def test_graph_break_check_for_an_auto_chosen_attention():
    # what "auto" asks before keeping a faster attention for a fullgraph compile
    block = next(m for m in tiny_adm().modules() if hasattr(m, "legacy_order"))
    set_attention(block, "sdpa")
    qkv = torch.randn(2, block.qkv.out_channels, 64)
    assert traces_in_one_graph(block._attention, qkv)

    def with_graph_break(t):
        torch._dynamo.graph_break()
        return t + 1

    def branching_on_a_value(t):
        return t * 2 if t.sum() > 0 else t

    assert not traces_in_one_graph(with_graph_break, qkv)
    assert not traces_in_one_graph(branching_on_a_value, qkv)


@pytest.mark.parametrize("new_order", [False, True])
def test_copy_attention_feeds_fused_sdpa_layouts_and_matches_adm(new_order, monkeypatch):
    unet, ve, class_map, _ = build_models(new_order=new_order)
    _, compiled = make_pair(unet, ve, class_map, FP32_EAGER_COPIES)
    seen = []
    original_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        seen.append((q.dim(), q.stride(-1), k.stride(-1), v.stride(-1)))
        return original_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([10, 500, 990])
    y = torch.tensor(class_map[:3])
    with torch.no_grad():
        copy_output = compiled.stepper.unet_lp(x, t, y)
        assert seen and all(entry == (4, 1, 1, 1) for entry in seen)  # fused-kernel layouts only
        reference = unet(x, t, y)
    torch.testing.assert_close(copy_output, reference, rtol=1e-5, atol=1e-6)
    # The user's model keeps ADM's own attention method; only the copy's blocks are rebound.
    assert all("_attention" not in m.__dict__ for m in unet.modules())
    assert any("_attention" in m.__dict__ for m in compiled.stepper.unet_lp.modules())


def test_cpu_low_precision_attention_runs_in_float32(monkeypatch):
    # The CPU workaround in compiled._sdpa_attention: a bf16 copy hands SDPA the float32 values of its
    # bf16 q/k/v (not the bf16 CPU flash-attention path) and rounds the result back to bf16 once.
    block = randomize_(AttentionBlock(64, num_head_channels=32), 0.2).eval()  # the digits middle block
    copy = low_precision_copy(block, torch.bfloat16, channels_last=False)
    set_attention(copy, "sdpa")
    seen = []
    original_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return original_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        actual = copy(x.bfloat16())
        assert seen == [(torch.float32,) * 3] and actual.dtype == torch.bfloat16
        expected = block(x)
    torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 weights and input


@pytest.mark.skipif(not xformers_available(), reason="xformers is not installed")
def test_xformers_attention_matches_sdpa():
    device = "cuda" if GPU else "cpu"
    unet, ve, class_map, _ = build_models(device)
    sdpa = make_pair(unet, ve, class_map, dict(compile=False, dtype="fp32", attention="sdpa"), device=device)[1].stepper
    options = dict(compile=False, dtype="fp32", attention="xformers")
    xformers = make_pair(unet, ve, class_map, options, device=device)[1].stepper
    x = torch.randn(2, 3, 16, 16, device=device)
    t = torch.full((2,), 400, device=device)
    y = torch.tensor(class_map[:2], device=device)
    with torch.no_grad():
        torch.testing.assert_close(xformers.unet_lp(x, t, y), sdpa.unet_lp(x, t, y), rtol=1e-4, atol=1e-5)


def test_choose_batch_size_fits_memory():
    gib = 2**30
    assert choose_batch_size(gib, 80 * gib, fixed_bytes=4 * gib, fraction=0.8) == 56  # 60 -> multiple of 8
    assert choose_batch_size(gib, 6 * gib, fraction=1.0) == 6  # below 8: not rounded
    assert choose_batch_size(1, 10**12, max_batch=64) == 64
    with pytest.raises(IGDSInputError, match="not enough free memory"):
        choose_batch_size(2 * gib, 3 * gib, fixed_bytes=gib, fraction=0.8)
    unet, ve, class_map, _ = build_models()
    assert make_pair(unet, ve, class_map, dict(compile=False, batch_size=12))[1].stepper.batch_size == 12
    compiled = make_pair(unet, ve, class_map, dict(compile=False))[1]
    assert compiled.stepper.batch_size == compiled.preferred_batch_size == 8  # CPU default
    assert isinstance(compiled.stepper, Stepper) and compiled.self_check_report is None  # before the first step


# ---- the user's model stays the float32 reference -------------------------------------------------
class FakeProbe:
    """probe_bytes(batch) of a step costing fixed + per_image * batch, plus a one-time cost the
    first time a batch size is seen (workspaces), optional noise, optional OOM above a size."""

    def __init__(self, fixed, per_image, first_time=0, noise=None, oom_above=None):
        self.fixed, self.per_image, self.first_time, self.noise, self.oom_above = (
            fixed, per_image, first_time, noise or {}, oom_above)
        self.calls = []

    def __call__(self, batch):
        if self.oom_above is not None and batch > self.oom_above:
            raise torch.cuda.OutOfMemoryError("fake")
        seen = batch in self.calls
        self.calls.append(batch)
        extra = 0 if seen else self.first_time
        return self.fixed + self.per_image * batch + extra + self.noise.get(batch, 0)


def test_step_memory_estimate_from_two_probed_batch_sizes():
    probe = FakeProbe(fixed=1000, per_image=300, first_time=5000)
    assert estimate_step_memory(probe) == (300, 1000)  # the first-time cost is read away
    assert probe.calls == [2, 2, 4, 4]
    # Noise making the difference non-positive: everything counts as per-image (over-estimate).
    noisy = FakeProbe(fixed=1000, per_image=10, noise={2: 50})
    assert estimate_step_memory(noisy) == (-(-(1000 + 40) // 4), 0)
    # Out of memory at batch 4: retried at 1 and 2; out of memory at 1: a one-line input error.
    assert estimate_step_memory(FakeProbe(fixed=1000, per_image=300, oom_above=3)) == (300, 1000)
    with pytest.raises(IGDSInputError, match="batch 1"):
        estimate_step_memory(FakeProbe(fixed=1000, per_image=300, oom_above=0))


def test_a_guidance_window_counts_two_graphs_per_batch_shape():
    assert graphs_per_batch_shape(GuidanceConfig(scale=1.0), 10) == 1
    assert graphs_per_batch_shape(GuidanceConfig(scale=0.0), 10) == 1
    assert graphs_per_batch_shape(GuidanceConfig(scale=1.0, guide_from_step=3), 10) == 2
    assert graphs_per_batch_shape(GuidanceConfig(scale=1.0, guide_until_step=9), 10) == 1
    assert graphs_per_batch_shape(GuidanceConfig(scale=1.0, guide_until_step=5), 10) == 2


def test_low_precision_copies_leave_the_users_models_untouched():
    unet, ve, class_map, _ = build_models()
    before = {k: (v.clone(), v.dtype, v.data_ptr()) for k, v in {**unet.state_dict(), **ve.state_dict()}.items()}
    requires_grad = [p.requires_grad for p in unet.parameters()]
    _, compiled = make_pair(unet, ve, class_map, dict(compile=False, dtype="bf16", encoder_dtype="fp16"), steps="2")
    step = compiled.stepper
    compiled.sample([0, 1], random_seeds(2))
    for key, value in {**unet.state_dict(), **ve.state_dict()}.items():
        saved, dtype, pointer = before[key]
        assert value.dtype == dtype and value.data_ptr() == pointer, key
        assert torch.equal(value, saved), key
    assert [p.requires_grad for p in unet.parameters()] == requires_grad
    copy_dtypes = {p.dtype for p in step.unet_lp.parameters()}
    assert copy_dtypes == {torch.bfloat16}
    assert {p.dtype for p in step.features_lp.encoder.parameters()} == {torch.float16}
    conv = next(m for m in step.unet_lp.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in step.unet_lp.parameters())


def test_low_precision_copy_keeps_tied_parameters_tied():
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    module[1].weight = module[0].weight
    duplicate = low_precision_copy(module, torch.bfloat16, channels_last=False)
    assert duplicate[1].weight is duplicate[0].weight and duplicate[0].weight.dtype == torch.bfloat16
    assert module[0].weight.dtype == torch.float32


# ---- fidelity on CPU ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aot_pair():
    """fp32 compiled (aot_eager: UNet and encoder through dynamo + AOTAutograd) vs eager; built once."""
    unet, ve, class_map, seed = build_models()
    options = dict(dtype="fp32", backend="aot_eager", channels_last=False)
    eager, compiled = make_pair(unet, ve, class_map, options, steps="4", gamma=0.3)
    return eager, compiled, ve, seed


def test_fp32_compiled_matches_eager(aot_pair):
    eager, compiled, ve, seed = aot_pair
    labels = torch.tensor([0, 3, 1, 3])
    found = check_fidelity(eager, compiled, ve, TOLERANCES["fp32"], labels, random_seeds(4))
    print(f"model seed {seed}: {found}")


def test_fp32_compiled_matches_eager_with_groups_and_given_noise(aot_pair):
    eager, compiled, _, _ = aot_pair
    labels = torch.tensor([2, 2, 1, 0])
    group_ids = torch.tensor([0, 1, 1, 0])
    x = torch.randn(4, 3, 16, 16)
    noise = torch.randn_like(x)
    unet_tol, x_tol, _, _ = TOLERANCES["fp32"]
    for i in (3, 0):
        for given in (noise, None):  # an explicit noise tensor, and no noise at all (posterior mean)
            expected = eager.step(x, i, labels, given, group_ids)
            actual = compiled.step(x, i, labels, given, group_ids).clone()
            assert relative_error(actual, expected) <= x_tol
    with_noise = compiled.step(x, 3, labels, noise, group_ids).clone()
    assert (with_noise - compiled.step(x, 3, labels, None, group_ids)).abs().max() > 1e-2


def test_static_buffers_hold_no_state_between_batches(aot_pair):
    _, compiled, _, _ = aot_pair
    labels_a, seeds_a = [1, 2, 3, 1], random_seeds(4)
    labels_b, seeds_b = [0, 0, 2, 3], random_seeds(4)
    first_b = compiled.sample(labels_b, seeds_b)
    compiled.sample(labels_a, seeds_a)
    again_b = compiled.sample(labels_b, seeds_b)
    torch.testing.assert_close(again_b, first_b, rtol=0, atol=0)
    step = compiled.stepper
    assert (4, False) in step.buffers
    x, buffers = step.begin_batch(torch.zeros(4, 3, 16, 16), torch.tensor(labels_a), seeds_a)
    assert x is step.buffers[(4, False)].x and buffers is step.buffers[(4, False)]  # the loop steps the static buffer


def test_a_padded_short_batch_reuses_the_full_batch_buffers(aot_pair):
    _, compiled, _, _ = aot_pair  # gamma 0.3: the default groups (labels) are made explicit
    step = compiled.stepper
    compiled.sample([1, 2, 3, 1], random_seeds(4))
    keys = set(step.buffers)
    seeds = random_seeds(2)
    padded = compiled.sample([3, 3], seeds, pad_to=4)
    assert (4, True) in keys and set(step.buffers) == keys  # no new batch shape: on a GPU, no new graph
    alone = compiled.sample([3, 3], seeds)  # a batch shape of its own
    assert set(step.buffers) == keys | {(2, True)}
    unet_tol, x_tol, _, _ = TOLERANCES["fp32"]
    assert padded.shape == alone.shape and relative_error(padded, alone) <= x_tol


def test_each_compiled_sampler_has_its_own_recompile_budget():
    # Dynamo fails hard (fullgraph=True) once one code object was compiled recompile_limit times; all
    # LowPrecisionUNets share one class forward, so without a per-instance code object the second
    # sampler below (another model, another batch) would raise FailOnRecompileLimitHit at limit 1.
    import torch._dynamo

    options = dict(dtype="fp32", backend="aot_eager", channels_last=False, compile_encoder=True)
    with torch._dynamo.config.patch(recompile_limit=1):
        for batch in (2, 3, 2):
            unet, ve, class_map, _ = build_models()
            eager, compiled = make_pair(unet, ve, class_map, options, steps="2")
            labels, seeds = torch.arange(batch) % NUM_CLASSES, random_seeds(batch)
            assert torch.equal(compiled.sample(labels, seeds), compiled.sample(labels, seeds))
    user_forward = type(compiled.stepper.unet_lp).forward
    assert compiled.stepper.unet_lp.forward.__func__.__code__ is not user_forward.__code__


def test_bf16_matches_eager_within_bf16_tolerances():
    unet, ve, class_map, seed = build_models()
    eager, compiled = make_pair(unet, ve, class_map, dict(dtype="bf16", compile=False, channels_last=False), steps="6")
    found = check_fidelity(eager, compiled, ve, TOLERANCES["bf16-cpu"], torch.tensor([0, 1, 2, 3]), random_seeds(4))
    print(f"model seed {seed}: {found}")
    assert found["unet"] > 1e-4  # the copy really computes in bf16 (fp32 would agree to ~1e-6)


def test_xt_mode_matches_eager():
    unet, ve, class_map, _ = build_models()
    eager, compiled = make_pair(unet, ve, class_map, FP32_EAGER_COPIES, steps="4", mode="xt", scale=2.0)
    labels = torch.tensor([3, 1])
    errors = teacher_forced_errors(eager, compiled, labels, random_seeds(2))
    assert max(e[2] for e in errors) <= TOLERANCES["fp32"][1], errors
    x0_mode = make_pair(unet, ve, class_map, FP32_EAGER_COPIES, steps="4", scale=2.0)[1]
    x = torch.randn(2, 3, 16, 16)
    seeds = random_seeds(2)
    xt_step = compiled.step(x, 3, labels, None, None, seeds).clone()
    assert (xt_step - x0_mode.step(x, 3, labels, None, None, seeds)).abs().max() > 1e-5  # the modes differ


def test_nonfinite_gradient_raises_after_the_batch_like_eager():
    unet, ve, class_map, _ = build_models()
    with torch.no_grad():
        ve.log_centroids[1, 0] = float("nan")  # only class 1 rows: KL reads log Q of their own label
    eager, compiled = make_pair(unet, ve, class_map, FP32_EAGER_COPIES, steps="4", guide_from_step=2)
    seeds = random_seeds(2)
    with pytest.raises(IGDSInputError, match=r"non-finite guidance gradient at sampling step 2 .*\[1\]"):
        eager.sample([0, 1], seeds)
    with pytest.raises(IGDSInputError, match=r"non-finite guidance gradient at sampling step 2 .*\[1\]"):
        compiled.sample([0, 1], seeds)
    compiled.sample([0, 2], seeds)  # the tracker is reset per batch
    unchecked = make_pair(unet, ve, class_map, FP32_EAGER_COPIES, steps="3", check_finite=False)[1]
    assert torch.isnan(unchecked.sample([1], seeds[:1])).any()


# GPU tests check fidelity and graph mechanics, not speed: mode "default" without the autotuning
# inductor flags keeps each compile short (max-autotune and the flags are bench/sampler.py's to time).
# Every compiling GPU test runs at one batch shape, GPU_BATCH (dynamic=False: another batch size is a
# cold compile); after the first, inductor's cache serves the same graphs again.
GPU_TEST_COMPILE = {"mode": "default", "inductor_options": {}}
GPU_BATCH = 4


@pytest.mark.parametrize("mode, gamma", [("x0", 0.0), ("x0", 0.3), ("xt", 0.3)])
def test_steps_before_the_last_read_nothing_back_to_the_host(mode, gamma, monkeypatch):
    # The CPU stand-in for the GPU test's sync-debug mode: between begin_batch and the last step the
    # compiled step never reads a tensor value on the host (an eager step on its own does: its finite
    # check — which shows the recorder sees such reads).
    unet, ve, class_map, _ = build_models()
    eager, compiled = make_pair(unet, ve, class_map, FP32_EAGER_COPIES, steps="4", mode=mode, gamma=gamma)
    labels, seeds = torch.tensor([0, 1, 1]), random_seeds(3)
    # The run's first step carries the once-per-run self-check (igds_fast.sampling.compiled.self_check), which reads its
    # errors back; every later batch's steps must read nothing.
    compiled.sample(labels, random_seeds(3))
    assert compiled.self_check_report is not None
    with compiled.batch(labels, seeds) as run:
        calls = host_reads(monkeypatch)
        with SyncingOpRecorder(calls):
            for _ in range(3):  # the loop of Sampler.sample, i = 3, 2, 1
                run.step()
        assert calls == [], f"host reads inside the step loop: {sorted(set(calls))}"
    x = run.x
    eager.step(x.clone(), 2, labels, None, None, seeds)
    assert calls, "the recorder saw no host read in the eager step on its own (its finite check)"
    del calls[:]
    with SyncingOpRecorder(calls):  # the dispatch recorder sees a read made inside ATen
        torch.arange(4)[torch.tensor(2)]
    assert calls == ["aten._local_scalar_dense"]
    del calls[:]
    compiled.step(x, 0, labels, None, None, seeds)  # the last step reads the non-finite tracker once
    assert calls and set(calls) <= {"item", "__bool__", "tolist", "__index__", "__int__"}


def test_inductor_compiled_unet_matches_eager():
    # Inductor's own code generation on CPU (C++): a smaller ADM (one level, attention at 16x16) keeps
    # the cold compile short; the encoder stays uncompiled here (aot_pair covers its compiled backward).
    unet, ve, class_map, _ = build_models(channel_mult=(1,), attention_resolutions="16")
    options = dict(dtype="fp32", compile_encoder=False, channels_last=False)
    eager, compiled = make_pair(unet, ve, class_map, options, steps="3")
    errors = teacher_forced_errors(eager, compiled, torch.tensor([0, 2]), random_seeds(2))
    unet_tol, x_tol, _, _ = TOLERANCES["fp32"]
    assert max(e[1] for e in errors) <= unet_tol and max(e[2] for e in errors) <= x_tol, errors


def test_digits_prior_architecture_in_bf16_under_inductor_matches_eager():
    # The demo's own prior architecture (1 channel, 16 px, middle-block attention of 64 channels in 2
    # heads of 32, T = 64, legacy order), compiled by inductor in bf16 and channels_last as a
    # `--backend compiled` run does: the shape at which torch 2.13's inductor returned NaN from the
    # attention block on an Intel Xeon. The encoder copy stays uncompiled (cold compile time).
    with torch.random.fork_rng():
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        unet = digits_adm()
        ve = tiny_ve(num_classes=10, channels=1, resolution=16)
    eager, compiled = make_pair(unet, ve, None, dict(dtype="bf16", compile_encoder=False), steps="4")
    labels = torch.tensor([0, 4, 7, 9])
    found = check_fidelity(eager, compiled, ve, TOLERANCES["bf16-cpu"], labels, random_seeds(4))
    print(f"digits architecture, bf16 inductor: {found}")
    assert found["unet"] > 1e-4  # really bf16
    assert not any(part["failed"] for part in compiled.self_check_report["parts"])


def test_cpu_without_interpreter_is_an_input_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    unet, ve, class_map, _ = build_models()
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the kernels compiled")
    with pytest.raises(IGDSInputError, match="TRITON_INTERPRET=1"):
        make_pair(unet, ve, class_map, dict(compile=False))


# ---- GPU: CUDA graphs ----------------------------------------------------------------------------
def gpu_models(seed=None):
    """A mid-size ADM (64x64, 3 levels, attention at 16 and 8) and a ResNet-18 VE on the GPU."""
    return build_models(
        "cuda", seed, image_size=64, num_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
        attention_resolutions="16,8", num_head_channels=32,
    )


@gpu
@gpu_only
def test_gpu_graphs_bf16_fidelity_and_graph_equivalence():
    unet, ve, class_map, seed = gpu_models()
    options = dict(dtype="bf16", **GPU_TEST_COMPILE)
    eager, compiled = make_pair(unet, ve, class_map, options, steps="50", device="cuda")
    step = compiled.stepper
    assert step.use_graphs
    labels = torch.tensor([0, 1, 2, 3], device="cuda")
    found = check_fidelity(eager, compiled, ve, TOLERANCES["bf16-gpu"], labels, random_seeds(GPU_BATCH))
    print(f"model seed {seed}: {found}")
    # The replayed graph computes what the same compiled step computes without it.
    x = torch.randn(GPU_BATCH, 3, 64, 64, device="cuda")
    seeds = random_seeds(GPU_BATCH)
    replayed = compiled.step(x, 30, labels, None, None, seeds).clone()
    step.use_graphs = False
    direct = compiled.step(x, 30, labels, None, None, seeds).clone()
    step.use_graphs = True
    assert relative_error(replayed, direct) <= 1e-3


@gpu
@gpu_only
def test_gpu_graph_loop_has_no_host_sync_and_reuses_graphs():
    unet, ve, class_map, _ = gpu_models()
    eager, compiled = make_pair(unet, ve, class_map, dict(GPU_TEST_COMPILE), steps="10", device="cuda")
    step = compiled.stepper
    labels = torch.tensor([1, 2, 3, 0], device="cuda")
    first = compiled.sample(labels, random_seeds(GPU_BATCH))  # captures the graph
    buffers = step.buffers[(GPU_BATCH, False)]
    graphs = dict(buffers.graphs)
    seeds = random_seeds(GPU_BATCH)
    x = compiled.noise_source(seeds, INITIAL_NOISE_STREAM, (3, 64, 64), "cuda")
    x, batch = step.begin_batch(x, labels, seeds, None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with step.numerics():
            for i in reversed(range(1, eager.schedule.num_steps)):  # the loop of Sampler.sample
                x = step.advance(x, i, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x = step.advance(x, 0, batch).clamp(-1, 1)
    step.finish_batch(batch)
    assert buffers.graphs == graphs  # same graph objects: captured once per batch shape
    fresh = make_pair(unet, ve, class_map, dict(GPU_TEST_COMPILE), steps="10", device="cuda")[1]
    torch.testing.assert_close(x, fresh.sample(labels, seeds), rtol=1e-3, atol=1e-3)
    assert not torch.equal(first, x)


@gpu
@gpu_only
def test_gpu_xt_mode_and_nonfinite_under_graphs():
    unet, ve, class_map, _ = gpu_models()
    eager, compiled = make_pair(unet, ve, class_map, dict(GPU_TEST_COMPILE), steps="8", device="cuda", mode="xt")
    labels = torch.tensor([0, 1, 3, 1], device="cuda")
    errors = teacher_forced_errors(eager, compiled, labels, random_seeds(GPU_BATCH))
    assert max(e[2] for e in errors) <= TOLERANCES["bf16-gpu"][1], errors
    with torch.no_grad():
        ve.log_centroids[2, 0] = float("nan")
    _, broken = make_pair(unet, ve, class_map, dict(GPU_TEST_COMPILE), steps="8", device="cuda")
    with pytest.raises(IGDSInputError, match=r"non-finite guidance gradient at sampling step 0 .*\[2\]"):
        broken.sample([0, 2, 0, 1], random_seeds(GPU_BATCH))


@gpu
@gpu_only
def test_gpu_batch_size_from_free_memory():
    unet, ve, class_map, _ = gpu_models()
    _, compiled = make_pair(unet, ve, class_map, dict(compile=False), device="cuda")
    step = compiled.stepper
    batch = step.batch_size
    assert 1 <= batch <= 256
    free, _ = torch.cuda.mem_get_info()
    available = free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # the cache counts as free
    # One step at the chosen batch really fits in the memory the choice budgeted.
    assert probe_step_bytes(step, batch) <= step.compile_config.memory_fraction * available * 1.1
