"""The soft-label protocols' augmentations: one epoch's draws, and their application to a batch.

All random numbers of an epoch are drawn up front, on the CPU, from a generator keyed by (seed,
epoch) -- :func:`draw_epoch` -> :class:`EpochDraws` -- so they do not depend on the world size, on
which rank applies them, or on whether the epoch was resumed; SRe2L's relabel file records exactly
these draws (``igds_fast.evaluate.relabel``) and training replays them.

Per image, as torchvision's transforms in the peers' pipelines (RDED validation/main.py:115-126,
SRe2L generate_soft_label.py:180-188):

* ``ShufflePatches(factor)`` (RDED utils.py:164-188): the image cut into ``factor`` strips of
  ``side // factor`` columns (a remainder dropped), the strips shuffled, then the same over rows.
* RandomResizedCrop(size, scale, ratio (3/4, 4/3)): torchvision's ``get_params`` (up to 10 draws of
  area ~ U(scale) and log-ratio ~ U(log ratio), w = round(sqrt(area * ratio)), h = round(sqrt(area /
  ratio)), a fitting box placed uniformly in whole pixels; else the central crop), and the box
  resized to ``size`` by ``F.interpolate(bilinear, antialias=True)`` -- what torchvision's
  ``resized_crop`` does on a tensor (RDED applies it to tensors). SRe2L applies it to PIL images
  (PIL's bilinear resize, also antialiased): the same box, resampling within float rounding of PIL's.
* horizontal flip with probability 1/2.

Per batch: CutMix (RDED utils.py:119-144, SRe2L utils_fkd.py:184-217): lambda ~ Beta(1, 1), a
random permutation of the batch, the box ``cut = int(side * sqrt(1 - lambda))`` around a uniform
pixel (rows from the first draw, columns from the second), clipped; the partner's pixels are copied
into the box. The teacher labels the mixed image, so the labels need no mixing.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.augment import sample_beta

_RRC_ATTEMPTS = 10


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator keyed by (seed, epoch): an epoch's draws are the same whenever it is run."""
    digest = hashlib.sha256(f"igds-kd:{int(seed)}:{int(epoch)}".encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


@dataclass
class EpochDraws:
    """One epoch's random choices; positions p = 0..N-1 are the epoch's order (batch b = positions
    [b * batch_size, (b + 1) * batch_size)).

    order [N] int64: the image at position p. crops [N, 4] int32: (top, left, height, width) in
    pixels of the source side. flips [N] bool. patch_perms [N, 2, factor] int64 (column strips, then
    row strips) or None when factor is 1. mix_partner [N] int64: the position (within its batch) of
    the partner whose pixels fill the box. mix_boxes [B, 4] int32: (row0, row1, col0, col1) on the
    output side. mix_lambda [B] float32 (recorded; the box is what counts)."""

    source_side: int
    output_side: int
    batch_size: int
    order: torch.Tensor
    crops: torch.Tensor
    flips: torch.Tensor
    patch_perms: torch.Tensor | None
    mix_partner: torch.Tensor
    mix_boxes: torch.Tensor
    mix_lambda: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.order.numel())

    @property
    def num_batches(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def batch_positions(self, batch: int) -> range:
        return range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.count))


def _rrc_boxes(count: int, side: int, scale, ratio, generator: torch.Generator) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for ``count`` square images of ``side``: [count, 4] int32."""
    area = float(side * side)
    target = area * (torch.rand(count, _RRC_ATTEMPTS, generator=generator, dtype=torch.float64)
                     * (scale[1] - scale[0]) + scale[0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.rand(count, _RRC_ATTEMPTS, generator=generator, dtype=torch.float64)
                       * (log_high - log_low) + log_low)
    # Python's round() is round-half-even, as torch.round.
    widths = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
    heights = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    fits = (widths > 0) & (widths <= side) & (heights > 0) & (heights <= side)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    # A square image is within the ratio range, so torchvision's fallback is the whole image.
    width = torch.where(any_fit, widths.gather(1, first)[:, 0], torch.full((count,), side, dtype=torch.int64))
    height = torch.where(any_fit, heights.gather(1, first)[:, 0], torch.full((count,), side, dtype=torch.int64))
    u = torch.rand(count, 2, generator=generator, dtype=torch.float64)
    top = torch.where(any_fit, torch.floor(u[:, 0] * (side - height + 1)).to(torch.int64), (side - height) // 2)
    left = torch.where(any_fit, torch.floor(u[:, 1] * (side - width + 1)).to(torch.int64), (side - width) // 2)
    return torch.stack([top, left, height, width], dim=1).to(torch.int32)


def _cutmix_box(side: int, lam: float, generator: torch.Generator) -> list[int]:
    """rand_bbox(size, lam) of RDED utils.py:119-135 / SRe2L utils_fkd.py:184-200 on a square side."""
    cut = int(side * math.sqrt(1.0 - lam))
    centre = torch.randint(0, side, (2,), generator=generator)
    row, col = int(centre[0]), int(centre[1])
    clip = lambda v: min(max(v, 0), side)  # noqa: E731
    return [clip(row - cut // 2), clip(row + cut // 2), clip(col - cut // 2), clip(col + cut // 2)]


def draw_epoch(seed: int, epoch: int, count: int, batch_size: int, source_side: int, output_side: int,
               crop_scale, crop_ratio=(3.0 / 4.0, 4.0 / 3.0), patch_factor: int = 1, flip: bool = True,
               cutmix_beta: float | None = 1.0) -> EpochDraws:
    """Every draw of epoch ``epoch`` (see the module docstring); ``cutmix_beta`` None = no mixing."""
    if count < 1 or batch_size < 1:
        raise IGDSInputError("an epoch needs at least one image and a positive batch size")
    generator = epoch_generator(seed, epoch)
    order = torch.randperm(count, generator=generator)
    side = source_side - source_side % patch_factor if patch_factor > 1 else source_side
    crops = _rrc_boxes(count, side, crop_scale, crop_ratio, generator)
    flips = (torch.rand(count, generator=generator) < 0.5) if flip else torch.zeros(count, dtype=torch.bool)
    patch_perms = None
    if patch_factor > 1:
        patch_perms = torch.argsort(torch.rand(count, 2, patch_factor, generator=generator), dim=2)
    num_batches = math.ceil(count / batch_size)
    partner = torch.arange(count, dtype=torch.int64) % batch_size
    boxes = torch.zeros(num_batches, 4, dtype=torch.int32)
    lambdas = torch.ones(num_batches, dtype=torch.float32)
    if cutmix_beta is not None:
        for batch in range(num_batches):
            start, stop = batch * batch_size, min((batch + 1) * batch_size, count)
            lam = float(sample_beta(cutmix_beta, generator)[0])
            partner[start:stop] = torch.randperm(stop - start, generator=generator)
            boxes[batch] = torch.tensor(_cutmix_box(output_side, lam, generator), dtype=torch.int32)
            lambdas[batch] = lam
    return EpochDraws(source_side=source_side, output_side=output_side, batch_size=batch_size, order=order,
                      crops=crops, flips=flips, patch_perms=patch_perms, mix_partner=partner, mix_boxes=boxes,
                      mix_lambda=lambdas)


def shuffle_patches(images: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """RDED's ShufflePatches with given permutations: images [n, C, H, W], perms [n, 2, f] -> [n, C, f*(H//f), f*(W//f)].

    Output column strip k is input strip perms[:, 0, k] (columns first, as RDED permutes the width
    first), then the same over rows with perms[:, 1]."""
    n, channels, height, width = images.shape
    factor = perms.shape[-1]
    device = images.device
    perms = perms.to(device)

    def gather(x, axis_size, perm, dim):
        strip = axis_size // factor
        offsets = torch.arange(strip, device=device)
        source = (perm[:, :, None] * strip + offsets[None, None, :]).reshape(n, factor * strip)
        shape = [n, 1, 1, 1]
        shape[dim] = factor * strip
        index = source.view(shape)
        expand = list(x.shape)
        expand[dim] = factor * strip
        return x.gather(dim, index.expand(expand))

    images = gather(images, width, perms[:, 0], 3)
    return gather(images, height, perms[:, 1], 2)


def crop_resize_flip(images: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box resized to ``size`` (bilinear, antialiased, as torchvision's tensor resized_crop), then flipped.

    images: float [n, C, H, W]; crops [n, 4] (top, left, height, width); flips [n] -> [n, C, size, size]."""
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=images.dtype, device=images.device)
    for k, (top, left, height, width) in enumerate(crops.tolist()):
        box = images[k:k + 1, :, top:top + height, left:left + width]
        out[k:k + 1] = F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    flips = flips.to(images.device)
    return torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)


def augment_positions(images: torch.Tensor, draws: EpochDraws, positions: torch.Tensor) -> torch.Tensor:
    """The augmented images (before mixing) at epoch positions ``positions``; images: float [n, C, S, S]
    of those positions' source images, in the same order."""
    if draws.patch_perms is not None:
        images = shuffle_patches(images, draws.patch_perms[positions])
    return crop_resize_flip(images, draws.crops[positions], draws.flips[positions], draws.output_side)


def mix_batch(local: torch.Tensor, partners: torch.Tensor, box) -> torch.Tensor:
    """CutMix: ``local`` with the box rows[r0:r1] x cols[c0:c1] taken from ``partners`` (both [n, C, S, S])."""
    r0, r1, c0, c1 = (int(v) for v in box)
    mixed = local.clone()
    mixed[:, :, r0:r1, c0:c1] = partners[:, :, r0:r1, c0:c1]
    return mixed


def kept_fraction(box, side: int) -> float:
    """1 - box area / side^2: the weight of an image's own label in a hard-label CutMix loss."""
    r0, r1, c0, c1 = (int(v) for v in box)
    return 1.0 - (r1 - r0) * (c1 - c0) / float(side * side)


__all__ = ["EpochDraws", "augment_positions", "crop_resize_flip", "draw_epoch", "epoch_generator", "kept_fraction",
           "mix_batch", "shuffle_patches"]
