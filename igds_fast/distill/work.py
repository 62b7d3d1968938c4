"""The work a distillation run implies, computed once from its settings and the models' declared sizes.

Before the job list is built and before any model is, `plan_distill` (and `plan_selection` for S³'s
G x IPC candidates) counts what the run would do and refuses in one line, with the number, what
exceeds a sane cap (igds_fast/limits.py WORK_CAPS) or cannot fit the device:

    images per class   IPC (x G for S³'s candidates)         <= 99,999 (OUT/<class>/<index:05d>.png)
    samples            classes x images per class x composite <= 10,000,000
    prior parameters   from the preset / header / shapes      <= 20,000,000,000
    memory             the prior's float32 weights + the largest buffer a step certainly holds
                       (batch x the larger of one sample [C, S, S] and one VE input [C, R, R], float32)
                       <= the device's memory (a CUDA device's total; the machine's RAM on a CPU)

The memory figure is a lower bound (activations come on top), so a refusal is certain to be right;
`--allow-large` (or IGDS_ALLOW_LARGE=1) lifts the caps and the memory check for a run that really is
that large (e.g. a machine with swap). Nothing here allocates: sizes come from headers and meta-device
models.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import IGDSInputError
from ..limits import check_work_cap, device_memory_bytes, format_bytes, large_allowed, override_hint

MAX_PRIOR_PARAMETERS = 20_000_000_000  # the largest diffusion priors in use are a few billion


def check_counts(classes: int, images_per_class: int, composite: int, allow_large: bool, per_class_detail: str) -> int:
    """Refuse too many images per class or samples in all (before the job list is built); returns the samples.

    per_class_detail: how the images per class were counted, for the message ("--ipc 10 x --groups 5").
    """
    check_work_cap("images per class", images_per_class, per_class_detail, allow_large)
    samples = classes * images_per_class * composite
    check_work_cap("samples", samples, f"{classes} classes x {images_per_class:,} images x {composite} sample(s) each",
                   allow_large)
    return samples


@dataclass(frozen=True)
class DistillWork:
    """What one run's step holds at least: the prior's weights and its largest buffer, at `batch`."""

    samples: int
    batch: int
    prior_parameters: int
    sample_shape: tuple[int, int, int]  # [C, S, S] of one sample the prior draws (a latent for a DiT)
    ve_shape: tuple[int, int, int]  # [C, R, R] of one VE input (the encoder's preprocessing)

    @property
    def model_bytes(self) -> int:
        return 4 * self.prior_parameters

    @property
    def largest_buffer_bytes(self) -> int:
        per_image = max(_volume(self.sample_shape), _volume(self.ve_shape))
        return 4 * self.batch * per_image

    @property
    def memory_bytes(self) -> int:
        return self.model_bytes + self.largest_buffer_bytes


def _volume(shape: tuple[int, int, int]) -> int:
    channels, height, width = shape
    return channels * height * width


def check_memory(work: DistillWork, device, allow_large: bool) -> None:
    """Refuse a prior past MAX_PRIOR_PARAMETERS, or weights + largest buffer past the device's memory."""
    if large_allowed(allow_large):
        return
    if work.prior_parameters > MAX_PRIOR_PARAMETERS:
        raise IGDSInputError(f"the prior declares {work.prior_parameters:,} parameters, above the cap of "
                             f"{MAX_PRIOR_PARAMETERS:,}; {override_hint()}")
    available = device_memory_bytes(device)
    if available is None or work.memory_bytes <= available:
        return
    channels, side, _ = work.sample_shape
    ve_channels, resolution, _ = work.ve_shape
    raise IGDSInputError(
        f"this run needs at least {format_bytes(work.memory_bytes)} on {device} (the prior's weights "
        f"{format_bytes(work.model_bytes)} + a batch of {work.batch} x max({channels}x{side}x{side} sample, "
        f"{ve_channels}x{resolution}x{resolution} VE input) in float32, {format_bytes(work.largest_buffer_bytes)}) "
        f"but it has {format_bytes(available)}; lower --batch-size, or {override_hint()}")


__all__ = ["DistillWork", "MAX_PRIOR_PARAMETERS", "check_counts", "check_memory"]
