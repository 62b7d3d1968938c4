"""The compiled backend checks itself: its first step against the eager float32 step on the same batch.

A low-precision copy under torch.compile can be wrong in ways no unit test of ours sees: a compiler
fault at one model's shapes (torch 2.13's inductor on CPU returned NaN from the digits prior's bf16
attention block on an Intel Xeon), a kernel that misbehaves on one device. So the first step of a run
(respaced index N-1, the first batch) is recomputed by the eager float32 reference step, and four
quantities are compared, per image, as relative L2 errors ||fast - reference|| / ||reference||:

    unet      the UNet output [B, 2C or C, H, W]                      (UNet copy, its compile)
    decoder   a latent prior's decoded x0 prediction [B, 3, H', W']   (decoder copy, its compile)
    features  encoder features z [B, d] of the same x0 prediction      (encoder copy, its compile)
    head      dJ/dz [B, d] of the reference features                   (Triton guidance head)
    gradient  dJ/dx0 [B, C, H, W] of the same x0 prediction            (encoder backward)
    step      x_{t-1} [B, C, H, W] from the same x_t, UNet output,     (update kernel, CUDA graph)
              gradient and noise (the eager update of this step's own inputs)

An error above the dtype's tolerance (SELF_CHECK_TOLERANCES), or a non-finite value where the
reference is finite, stops the run with one line (IGDSNumericsError) naming the part and the error.
For the UNet and the encoder, the line also names the first module (in the order modules finish,
so the innermost first) whose output leaves the tolerance in the uncompiled low-precision copy, or
says that the uncompiled copy agrees and the fault is torch.compile's. Images whose reference is
non-finite are not compared: the eager semantics (a non-finite guidance gradient is an input error,
raised after the batch) stay the sampler's.

Cost: one eager step on at most MAX_CHECKED_IMAGES images (whole diversity groups when gamma != 0:
the InfoNCE term couples a group), once per CompiledStep, i.e. once per run, not once per batch. A
failed check is reported once: CompiledStep does not run it again at its next call.

`run_self_check(step, buffers, x_before, i, noise_kind)` is the check CompiledStep.advance runs;
the rest of this module are its parts (comparison, diagnosis, the one-line message).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ...errors import IGDSNumericsError
from ...kernels import philox_normal, predict_x0
from ..eager import fp32_reference_math
from ..step import StepInputs, StepOps
from .low_precision import LowPrecisionFeatures, LowPrecisionUNet

MAX_CHECKED_IMAGES = 4
PARTS = ("unet", "decoder", "features", "head", "gradient", "step")

# Max over the checked images of the relative L2 error, per compute dtype of the part's module (the
# UNet copy's dtype for "unet" and "step", the decoder copy's for "decoder", the encoder copy's for
# "features" and "gradient").
# Why these values: module docstring of tests/test_self_check.py, which measures them at the digits
# prior, the tiny test ADMs and the adm256 preset with a ResNet-50 VE (random weights).
SELF_CHECK_TOLERANCES: dict[str, dict[str, float]] = {
    "bf16": {"unet": 5e-2, "decoder": 5e-2, "features": 5e-2, "head": 1e-3, "gradient": 1.0, "step": 1e-3},
    "fp16": {"unet": 1e-2, "decoder": 1e-2, "features": 1e-2, "head": 1e-3, "gradient": 1.0, "step": 1e-3},
    # fp32 copies under torch.compile: the same math in another order, plus TF32 convolutions on
    # CUDA (cuDNN's default, 10 mantissa bits like fp16) — bounded like fp16.
    "fp32": {"unet": 1e-2, "decoder": 1e-2, "features": 1e-2, "head": 1e-3, "gradient": 1.0, "step": 1e-3},
}


def checked_rows(labels: torch.Tensor, group_ids: torch.Tensor | None, coupled: bool,
                 limit: int = MAX_CHECKED_IMAGES) -> torch.Tensor:
    """Indices of the images the check recomputes: the first `limit`, closed under diversity groups.

    coupled: the guidance couples the images of a group (gamma != 0); groups are `group_ids`, or the
    labels when None. Whole groups are taken in order of first appearance until `limit` is reached,
    so a group larger than `limit` is still checked whole. One host read (the group keys), once.
    """
    batch = labels.shape[0]
    if not coupled:
        return torch.arange(min(batch, limit), device=labels.device)
    keys = (labels if group_ids is None else group_ids).tolist()
    chosen: list[int] = []
    seen: set[int] = set()
    for key in keys:
        if key in seen:
            continue
        seen.add(key)
        chosen.extend(row for row, other in enumerate(keys) if other == key)
        if len(chosen) >= limit:
            break
    return torch.tensor(sorted(chosen), dtype=torch.long, device=labels.device)


def relative_errors(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per-image ||actual - expected|| / ||expected|| in float64 [B]; inf where actual is not finite."""
    actual, expected = actual.detach().double().flatten(1), expected.detach().double().flatten(1)
    errors = (actual - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-30)
    return torch.where(torch.isfinite(actual).all(dim=1), errors, torch.full_like(errors, float("inf")))


def compare(part: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> dict:
    """{part, error, worst_image, tolerance, compared, nonfinite, failed} for one part.

    error: the worst relative error over the images whose reference is finite (worst_image: its
    row); nonfinite: how many of them are non-finite in `actual`.
    """
    reference_finite = torch.isfinite(expected.detach()).flatten(1).all(dim=1)
    errors = torch.where(reference_finite, relative_errors(actual, expected), torch.full_like(reference_finite, -1.0,
                                                                                            dtype=torch.float64))
    compared = int(reference_finite.sum())
    worst_image = int(errors.argmax())
    worst = max(float(errors[worst_image]), 0.0)
    return {
        "part": part,
        "error": worst,
        "worst_image": worst_image,
        "tolerance": tolerance,
        "compared": compared,
        "nonfinite": int(torch.isinf(errors).sum()),
        "failed": worst > tolerance,
    }


def first_diverging_module(
    reference: nn.Module,
    candidate: nn.Module,
    run_reference: Callable[[], object],
    run_candidate: Callable[[], object],
    tolerance: float,
) -> tuple[str, str, str] | None:
    """(qualified name, class name, what) of the first module whose candidate output leaves tolerance.

    Both modules must have the same structure (the candidate is a copy of the reference). Forward
    hooks record every named submodule's tensor output in the reference run, then compare the
    candidate's outputs in the order its modules finish: the first one that is non-finite where the
    reference is finite, or whose relative L2 error exceeds `tolerance`, is returned (None: every
    module agrees). Diagnosis only (it keeps every module's output of the checked images).
    """
    recorded: dict[tuple[str, int], torch.Tensor] = {}

    def record(name: str):
        def hook(module, inputs, output):
            if torch.is_tensor(output):
                calls = sum(1 for key in recorded if key[0] == name)
                recorded[(name, calls)] = output.detach().float()
        return hook

    found: list[tuple[str, str, str]] = []
    seen: dict[str, int] = {}

    def check(name: str):
        def hook(module, inputs, output):
            if found or not torch.is_tensor(output):
                return
            call = seen.get(name, 0)
            seen[name] = call + 1
            expected = recorded.get((name, call))
            if expected is None or expected.shape != output.shape:
                return
            actual = output.detach().float()
            if not bool(torch.isfinite(expected).all()):
                return
            if not bool(torch.isfinite(actual).all()):
                found.append((name, type(module).__name__, "non-finite output"))
                return
            error = float(relative_errors(actual.flatten().unsqueeze(0), expected.flatten().unsqueeze(0))[0])
            if error > tolerance:
                found.append((name, type(module).__name__, f"relative error {error:.3g}"))
        return hook

    def run_with_hooks(module: nn.Module, make_hook, run):
        handles = [m.register_forward_hook(make_hook(name)) for name, m in module.named_modules() if name]
        try:
            with torch.no_grad():
                run()
        finally:
            for handle in handles:
                handle.remove()

    run_with_hooks(reference, record, run_reference)
    run_with_hooks(candidate, check, run_candidate)
    return found[0] if found else None


def failure_message(result: dict, where: str, index: int, what: str, culprit: str | None) -> str:
    """The one-line IGDSNumericsError text of a failed part."""
    if result["nonfinite"]:
        problem = f"non-finite in {result['nonfinite']} of {result['compared']} checked images (finite in the float32 reference)"
    else:
        problem = (f"off by {result['error']:.3g} relative L2 from the float32 reference "
                   f"(tolerance {result['tolerance']:.0e})")
    line = f"compiled backend self-check failed at the first step (respaced index {index}) in the {where}: {what} {problem}"
    return f"{line}; {culprit}" if culprit else line


def raise_if_failed(results: list[dict], index: int, describe: Callable[[dict], tuple[str, str, str | None]]) -> None:
    """Raise IGDSNumericsError for the first failed part; describe(result) -> (where, what, culprit)."""
    for result in results:
        if result["failed"]:
            where, what, culprit = describe(result)
            raise IGDSNumericsError(failure_message(result, where, index, what, culprit))


def run_self_check(step, b, x_before: torch.Tensor, i: int, noise_kind: str) -> dict:
    """Compare a CompiledStep's first step with the eager float32 reference; raise on a disagreement.

    b: the step's BatchBuffers just stepped (b.x holds x_{t-1}; b.index still holds i); x_before:
    x_t of the batch before the step; noise_kind: the step's ("philox", "tensor" or "none").
    Returns {"index", "images", "parts": [per-part comparison]} when every part agrees; raises
    IGDSNumericsError naming the first failed part (module docstring) otherwise.
    """
    c = step.context
    cfg = c.guidance_config
    reference_guidance = c.guidance  # the eager head (GuidanceConfig.head) and the float32 encoder
    unet_tolerances = SELF_CHECK_TOLERANCES[step.compile_config.dtype]
    encoder_tolerances = SELF_CHECK_TOLERANCES[step.compile_config.encoder_dtype]
    rows = checked_rows(b.labels, b.group_ids, coupled=cfg.gamma != 0.0)
    x_rows, labels = x_before[rows], b.labels[rows]
    groups = None if b.group_ids is None else b.group_ids[rows]
    timesteps = c.schedule.timestep_map[i].expand(rows.numel())
    prior_labels = None if b.prior_labels is None else b.prior_labels[rows]
    results = []
    with fp32_reference_math(step.device), torch.no_grad():
        expected_output = c.unet(x_rows, timesteps, prior_labels)
    results.append(compare("unet", step.last_model_output[rows], expected_output, unet_tolerances["unet"]))

    x0_rows = fast_grad = None
    if any(c.guided(k) for k in range(c.num_steps)):
        # The guidance of the same x0 prediction (this step's, full batch: the compiled encoder
        # keeps its one static shape), fast vs reference.
        with torch.no_grad():
            x0 = predict_x0(x_before, step.last_model_output, b.index, step.tables, c.learn_sigma,
                            clip=cfg.clip_x0)
        x0_rows = x0[rows]
        if reference_guidance.decoder is not None:
            # The decoded image the encoder sees (a latent prior), fast copy vs float32 decoder.
            with torch.no_grad():
                fast_image = step.ops.guidance.decode(x0)
            with fp32_reference_math(step.device), torch.no_grad():
                expected_image = reference_guidance.decode(x0_rows)
            results.append(compare("decoder", fast_image[rows], expected_image,
                                   SELF_CHECK_TOLERANCES[step.compile_config.decoder_dtype]["decoder"]))
        with torch.enable_grad():
            fast_features = step.ops.guidance.encode(x0.detach().requires_grad_(True)).detach()
        with fp32_reference_math(step.device), torch.no_grad():
            expected_features = reference_guidance.encode(x0_rows)
        results.append(compare("features", fast_features[rows], expected_features, encoder_tolerances["features"]))
        # The Triton head (always fp32) on the reference features against the reference head.
        _, fast_head = step.ops.guidance.head_gradient(expected_features, labels, groups)
        with fp32_reference_math(step.device):
            _, expected_head = reference_guidance.head_gradient(expected_features, labels, groups)
        results.append(compare("head", fast_head, expected_head, encoder_tolerances["head"]))
        _, fast_grad = step.ops.guidance(x0, b.labels, b.group_ids)
        with fp32_reference_math(step.device):
            _, expected_grad = reference_guidance(x0_rows, labels, groups)
        results.append(compare("gradient", fast_grad[rows], expected_grad, encoder_tolerances["gradient"]))

    # The update (fused kernel, and its CUDA graph) against the eager update of the same inputs:
    # this step's own UNet output and guidance gradient, recomputed outside the graph. (The
    # eager step from x_t itself is no test of the update: at the first step x0_hat =
    # x_t / sqrt(abar) - sqrt(1/abar - 1) eps amplifies the UNet's rounding by sqrt(1/abar - 1),
    # so its guidance sees another x0_hat.)
    step_grad = None
    if c.guided(i):
        if cfg.mode == "xt":
            inputs = b.inputs(i, "none")
            inputs.trace = None
            step_grad = step.ops.unet_and_gradient(x_before, inputs)[2]
        else:
            step_grad = fast_grad
    if noise_kind == "tensor":
        noise = b.noise[rows]
    elif noise_kind == "philox" and i > 0:
        noise = philox_normal(b.seeds[rows], i, x_before.shape[1:], step.device)
    else:
        noise = None
    inputs = StepInputs(i, b.index, labels, prior_labels, groups, None, noise)
    with torch.no_grad():
        expected_next = StepOps(c).update(x_rows, step.last_model_output[rows], None,
                                          None if step_grad is None else step_grad[rows], inputs)
    results.append(compare("step", b.x[rows], expected_next, unet_tolerances["step"]))

    def describe(result):
        one = slice(result["worst_image"], result["worst_image"] + 1)  # diagnosis keeps every module's output
        return _describe_failure(step, result, x_rows[one], timesteps[one],
                                 None if prior_labels is None else prior_labels[one],
                                 None if x0_rows is None else x0_rows[one])

    raise_if_failed(results, i, describe)
    return {"index": i, "images": int(rows.numel()), "parts": results}


def _describe_failure(step, result, x_rows, timesteps, prior_labels, x0_rows):
    """(where, what, culprit) of a failed self-check part, locating the module on its worst image."""
    c = step.context
    cfg = step.compile_config
    compiled_note = f", torch.compile backend {cfg.backend}" if cfg.compile else ""
    part = result["part"]
    if part == "step":
        where = f"fused {c.sampler.upper()} update kernel" + (" / CUDA graph replay" if step.use_graphs else "")
        return where, "x_(t-1)", "the UNet output and the guidance agree: the update or its graph differs"
    if part == "unet":
        where = f"UNet copy ({cfg.dtype}{compiled_note})"
        if isinstance(step.unet_lp, LowPrecisionUNet):
            copy = step.unet_lp
            with fp32_reference_math(step.device):
                found = first_diverging_module(
                    c.unet, copy.unet, lambda: c.unet(x_rows, timesteps, prior_labels),
                    lambda: copy(x_rows, timesteps, prior_labels), result["tolerance"],
                )
            return where, "UNet output", _culprit(found, cfg.dtype, "UNet", cfg.compile)
        return "TensorRT UNet engine", "UNet output", f"engine {cfg.unet_engine}"
    if part == "decoder":
        where = f"decoder copy ({cfg.decoder_dtype}{compiled_note if cfg.compile_encoder else ''})"
        decoder, copy = c.guidance.decoder, step.decoder_lp
        if isinstance(decoder, nn.Module) and isinstance(copy, nn.Module):
            with fp32_reference_math(step.device):
                found = first_diverging_module(decoder, copy, lambda: decoder(x0_rows), lambda: copy(x0_rows),
                                               result["tolerance"])
            return where, "decoded image", _culprit(found, cfg.decoder_dtype, "decoder",
                                                    cfg.compile and cfg.compile_encoder)
        return where, "decoded image", None
    where = f"VE encoder copy ({cfg.encoder_dtype}{compiled_note if cfg.compile_encoder else ''})"
    if part == "head":
        return "Triton guidance head", "dJ/dz of the reference features", None
    if part == "gradient":  # features and head agree
        backward = "decoder's and encoder's" if c.guidance.decoder is not None else "encoder's"
        return where, "guidance gradient dJ/dx0", f"features and head agree: the {backward} input-gradient backward differs"
    ve = c.guidance.ve
    features = step.features_lp
    if isinstance(features, LowPrecisionFeatures) and isinstance(getattr(ve, "encoder", None), nn.Module):
        with fp32_reference_math(step.device):
            with torch.no_grad():  # the encoder's input: the decoded image of a latent prior
                image = c.guidance.decode(x0_rows)
            found = first_diverging_module(
                ve.encoder, features.encoder, lambda: ve.features(image), lambda: features(image),
                result["tolerance"],
            )
        return where, "encoder features", _culprit(found, cfg.encoder_dtype, "encoder",
                                                   cfg.compile and cfg.compile_encoder)
    return "VE features", "encoder features", None


def _culprit(found, dtype: str, what: str, compiled: bool) -> str:
    """The diagnosis of a UNet / decoder / encoder part: the first diverging module, or whose fault it is."""
    if found is not None:
        name, kind, problem = found
        return f"first in {what} module '{name}' ({kind}): {problem} in the uncompiled {dtype} copy"
    if compiled:
        return (f"the uncompiled {dtype} copy agrees: a torch.compile fault; run with compile options "
                f"{{\"compile\": false}} or another dtype")
    return "no single module leaves the tolerance: the error accumulates over the network"


__all__ = [
    "MAX_CHECKED_IMAGES",
    "PARTS",
    "SELF_CHECK_TOLERANCES",
    "checked_rows",
    "compare",
    "first_diverging_module",
    "raise_if_failed",
    "relative_errors",
    "run_self_check",
]
