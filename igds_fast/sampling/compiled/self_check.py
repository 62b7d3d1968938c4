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
the InfoNCE term couples a group), once per CompiledStep, i.e. once per run, not once per batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ...errors import IGDSNumericsError

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


__all__ = [
    "MAX_CHECKED_IMAGES",
    "PARTS",
    "SELF_CHECK_TOLERANCES",
    "checked_rows",
    "compare",
    "first_diverging_module",
    "raise_if_failed",
    "relative_errors",
]
