"""Training augmentations of the evaluation protocol, batched on the images' device.

IGDS_SPEC section 7 / the paper's Appendix F list random-resized-crop, horizontal flip and CutMix,
following IDC / MinimaxDiffusion. Their facts (from MinimaxDiffusion's ``data.py``,
``argument.py``, ``train.py`` and ``misc/utils.py``):

* RandomResizedCrop(size, scale=(0.5, 1.0)) -- *not* torchvision's default (0.08, 1.0) -- with
  torchvision's default aspect ratios (3/4, 4/3), then RandomHorizontalFlip(p=0.5).
* CutMix with ``beta = 1.0`` and ``mix_p = 1.0`` for ImageNet subsets (every batch is mixed): one
  lambda ~ Beta(beta, beta) and one box per batch, partner images from a random permutation, the
  box side ``int(side * sqrt(1 - lambda))`` centred at a uniform random pixel and clipped, and the
  loss weighted by the *actual* kept area after clipping.

MinimaxDiffusion's loader also applies colour jitter and PCA lighting after the flip; the IGDS
paper names only the three augmentations above, so its protocol leaves them out, and the
``minimax`` protocol (:mod:`igds_fast.evaluate.protocol`) turns them on. Their facts (its
``misc/utils.py``), per image, on the image in [0, 1]:

* ColorJitter(0.4, 0.4, 0.4): brightness, contrast and saturation in a random order, each
  ``img.lerp(target, a)`` with ``a ~ U(-0.4, 0.4)``: target 0 (brightness), the mean of the
  grey image (contrast), the grey image ``0.299 R + 0.587 G + 0.114 B`` (saturation). No clamping.
* Lighting (AlexNet PCA noise): ``alpha ~ N(0, 0.1)^3``, ``img[c] += sum_j eigvec[c, j] * alpha[j]
  * eigval[j]`` with ImageNet's eigenvalues (0.2175, 0.0188, 0.0045) and eigenvectors.

Flip is a flag because it is wrong for data whose meaning changes when mirrored (digits).

Everything is a tensor op on the batch (no per-sample Python), and every random draw comes from
the ``torch.Generator`` passed in (on the images' device), so a seed fixes the result exactly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from igds_fast.errors import IGDSInputError

_RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop also tries 10 draws before falling back


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run and with what parameters (defaults = the protocol)."""

    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    horizontal_flip: bool = True
    cutmix_prob: float = 1.0
    cutmix_beta: float = 1.0
    # MinimaxDiffusion's colour jitter strength (brightness = contrast = saturation); 0 = off.
    color_jitter: float = 0.0
    # Standard deviation of the PCA lighting noise; 0 = off.
    lighting_std: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.color_jitter <= 1.0:
            raise IGDSInputError(f"color_jitter must be in [0, 1], got {self.color_jitter}")
        if not self.lighting_std >= 0.0:
            raise IGDSInputError(f"lighting_std must be >= 0, got {self.lighting_std}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise IGDSInputError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise IGDSInputError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if not 0.0 <= self.cutmix_prob <= 1.0:
            raise IGDSInputError(f"cutmix_prob must be in [0, 1], got {self.cutmix_prob}")
        if not self.cutmix_beta > 0.0:
            raise IGDSInputError(f"cutmix_beta must be > 0, got {self.cutmix_beta}")

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(shape, generator: torch.Generator, low=0.0, high=1.0) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device) * (high - low) + low


def crop_and_flip(
    images: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    crop: bool = True,
    flip: bool = True,
) -> torch.Tensor:
    """Random-resized-crop and/or horizontal flip of every image, in one bilinear resampling pass.

    Per image (as torchvision's RandomResizedCrop): area fraction ~ U(scale), log aspect ratio ~
    U(log ratio); up to 10 draws until the box fits, else the whole image; position uniform; the
    box is resized back to the input size (bilinear, align_corners=False). Flip: p = 0.5 per image.
    Boxes are continuous rather than whole pixels. A full-image, unflipped box is the identity.
    """
    if images.dim() != 4:
        raise IGDSInputError(f"expected [N,C,H,W] images, got shape {tuple(images.shape)}")
    if not crop and not flip:
        return images
    batch, _, height, width = images.shape
    dtype = images.dtype if images.is_floating_point() else torch.float32
    if crop:
        area = _uniform((batch, _RRC_ATTEMPTS), generator, scale[0], scale[1])
        log_ratio = _uniform((batch, _RRC_ATTEMPTS), generator, math.log(ratio[0]), math.log(ratio[1]))
        aspect = torch.exp(log_ratio)
        # Box sides as fractions of the image sides: pixel area s*H*W with w/h = aspect.
        frac_w = torch.sqrt(area * aspect * height / width)
        frac_h = torch.sqrt(area / aspect * width / height)
        fits = (frac_w <= 1.0) & (frac_h <= 1.0)
        first_fit = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)
        any_fit = fits.any(dim=1)
        frac_w = torch.where(any_fit, frac_w.gather(1, first_fit)[:, 0], torch.ones_like(any_fit, dtype=frac_w.dtype))
        frac_h = torch.where(any_fit, frac_h.gather(1, first_fit)[:, 0], torch.ones_like(any_fit, dtype=frac_h.dtype))
        offset = _uniform((batch, 2), generator)
        # Box centre in normalised [-1, 1] coordinates: left edge uniform in [0, 1 - frac].
        centre_x = 2.0 * (offset[:, 0] * (1.0 - frac_w) + frac_w / 2.0) - 1.0
        centre_y = 2.0 * (offset[:, 1] * (1.0 - frac_h) + frac_h / 2.0) - 1.0
    else:
        ones = torch.ones(batch, device=generator.device)
        frac_w, frac_h = ones, ones
        centre_x, centre_y = ones * 0.0, ones * 0.0
    sign = torch.ones(batch, device=generator.device)
    if flip:
        flipped = _uniform((batch,), generator) < 0.5
        sign = torch.where(flipped, -sign, sign)
    theta = torch.zeros(batch, 2, 3, device=generator.device)
    theta[:, 0, 0] = frac_w * sign
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = frac_h
    theta[:, 1, 2] = centre_y
    theta = theta.to(device=images.device, dtype=dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(images.dtype) if images.is_floating_point() else out


# ImageNet's RGB PCA (AlexNet), as MinimaxDiffusion's ``Lighting`` uses it.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
_GREY_WEIGHTS = (0.299, 0.587, 0.114)


def _check_rgb(images: torch.Tensor, what: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise IGDSInputError(f"{what} expects float RGB images [N,3,H,W], got {images.dtype} {tuple(images.shape)}")


def color_jitter(images: torch.Tensor, generator: torch.Generator, strength: float = 0.4) -> torch.Tensor:
    """MinimaxDiffusion's ColorJitter on images in [-1, 1] (applied to ``(x + 1) / 2``, mapped back).

    images: float [N, 3, H, W]. Per image: a uniformly random order of (brightness, contrast,
    saturation); each op is ``x + a * (target - x)``, ``a ~ U(-strength, strength)``, with target
    0, mean(grey) or grey (``grey = 0.299 R + 0.587 G + 0.114 B``, broadcast over channels).
    """
    _check_rgb(images, "color_jitter")
    if strength == 0.0:
        return images
    batch = images.shape[0]
    order = torch.argsort(_uniform((batch, 3), generator), dim=1).to(images.device)  # a random permutation per image
    amounts = _uniform((batch, 3), generator, -strength, strength).to(images.device, images.dtype)
    weights = torch.tensor(_GREY_WEIGHTS, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    x = (images + 1.0) * 0.5
    for position in range(3):
        op = order[:, position].view(-1, 1, 1, 1)
        grey = (x * weights).sum(dim=1, keepdim=True)
        targets = (
            torch.zeros_like(grey),  # brightness: towards black
            grey.mean(dim=(2, 3), keepdim=True),  # contrast: towards the mean grey level
            grey,  # saturation: towards the grey image
        )
        target = torch.where(op == 0, targets[0], torch.where(op == 1, targets[1], targets[2]))
        amount = amounts.gather(1, order[:, position : position + 1]).view(-1, 1, 1, 1)
        x = x + amount * (target - x)
    return x * 2.0 - 1.0


def pca_lighting(images: torch.Tensor, generator: torch.Generator, std: float = 0.1) -> torch.Tensor:
    """AlexNet-style PCA lighting noise on images in [-1, 1] (as MinimaxDiffusion's on [0, 1]).

    images: float [N, 3, H, W]; per image ``alpha ~ N(0, std)^3`` and channel c gets
    ``sum_j eigvec[c, j] * alpha[j] * eigval[j]`` added in [0, 1] units (twice that in [-1, 1]).
    """
    _check_rgb(images, "pca_lighting")
    if std == 0.0:
        return images
    alpha = torch.randn((images.shape[0], 3), generator=generator, device=generator.device) * std
    eigvec = torch.tensor(IMAGENET_PCA_EIGVEC, device=alpha.device)
    eigval = torch.tensor(IMAGENET_PCA_EIGVAL, device=alpha.device)
    shift = (eigvec[None] * (alpha * eigval)[:, None, :]).sum(dim=2)  # [N, 3]
    return images + 2.0 * shift.to(images.device, images.dtype).view(-1, 3, 1, 1)


def random_horizontal_flip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p`` (exact pixel flip, no resampling)."""
    flipped = (_uniform((images.shape[0],), generator) < p).to(images.device)
    return torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)


def sample_beta(alpha: float, generator: torch.Generator, size: int = 1) -> torch.Tensor:
    """Beta(alpha, alpha) draws from ``generator`` (torch.distributions cannot take a generator).

    alpha = 1 is the uniform distribution. Otherwise X / (X + Y) with X, Y ~ Gamma(alpha), each by
    Marsaglia & Tsang's squeeze-rejection method (vectorised over 64 candidates; for alpha < 1 the
    Gamma(alpha + 1) * U^(1/alpha) boost).
    """
    if alpha == 1.0:
        return _uniform((size,), generator)
    gammas = _sample_gamma(alpha, generator, 2 * size)
    return gammas[:size] / (gammas[:size] + gammas[size:])


def _sample_gamma(alpha: float, generator: torch.Generator, size: int, candidates: int = 64) -> torch.Tensor:
    boost = alpha < 1.0
    shape = alpha + 1.0 if boost else alpha
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    normal = torch.randn((size, candidates), generator=generator, device=generator.device)
    uniform = _uniform((size, candidates), generator)
    v = (1.0 + c * normal) ** 3
    log_v = torch.log(v.clamp_min(1e-30))
    accept = (v > 0) & (torch.log(uniform.clamp_min(1e-30)) < 0.5 * normal**2 + d - d * v + d * log_v)
    # Acceptance is >= 95% per candidate, so 64 candidates all failing has probability < 1e-80.
    first = torch.argmax(accept.to(torch.int8), dim=1, keepdim=True)
    sample = (d * v).gather(1, first)[:, 0]
    if boost:
        sample = sample * _uniform((size,), generator).clamp_min(1e-30) ** (1.0 / alpha)
    return sample


def cutmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    beta: float = 1.0,
    prob: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutMix a batch (one box, one lambda per batch, as Yun et al. 2019 and MinimaxDiffusion).

    Returns ``(mixed_images, labels, partner_labels, kept_fraction)``; train with
    ``kept * CE(out, labels) + (1 - kept) * CE(out, partner_labels)``. ``kept_fraction`` is a 0-dim
    tensor: 1 - (clipped box area) / (H * W), or exactly 1 when the batch is not mixed (with
    probability 1 - prob). All on the device, no host synchronisation.
    """
    if images.dim() != 4 or labels.shape != images.shape[:1]:
        raise IGDSInputError(
            f"cutmix expects images [N,C,H,W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    batch, _, height, width = images.shape
    device = generator.device
    apply = _uniform((1,), generator)[0] < prob
    lam = sample_beta(beta, generator)[0]
    permutation = torch.randperm(batch, generator=generator, device=device)
    centre = _uniform((2,), generator)
    cut_ratio = torch.sqrt(1.0 - lam)
    cut_h = torch.floor(height * cut_ratio)
    cut_w = torch.floor(width * cut_ratio)
    centre_y = torch.floor(centre[0] * height)
    centre_x = torch.floor(centre[1] * width)
    top = (centre_y - torch.div(cut_h, 2, rounding_mode="floor")).clamp(0, height)
    bottom = (centre_y + torch.div(cut_h, 2, rounding_mode="floor")).clamp(0, height)
    left = (centre_x - torch.div(cut_w, 2, rounding_mode="floor")).clamp(0, width)
    right = (centre_x + torch.div(cut_w, 2, rounding_mode="floor")).clamp(0, width)
    rows = torch.arange(height, device=device, dtype=top.dtype)
    cols = torch.arange(width, device=device, dtype=top.dtype)
    inside = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None, :]
    inside = inside & apply
    box_fraction = inside.sum() / float(height * width)
    permutation = permutation.to(images.device)
    mixed = torch.where(inside.to(images.device), images[permutation], images)
    kept = (1.0 - box_fraction).to(device=images.device, dtype=torch.float32)
    return mixed, labels, labels[permutation.to(labels.device)], kept


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, config: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop/flip (then colour jitter and lighting when on) then CutMix a batch per ``config``: (images, labels, partner_labels, kept_fraction)."""
    images = crop_and_flip(
        images, generator, config.crop_scale, config.crop_ratio,
        crop=config.random_resized_crop, flip=config.horizontal_flip,
    )
    if config.color_jitter > 0.0:
        images = color_jitter(images, generator, config.color_jitter)
    if config.lighting_std > 0.0:
        images = pca_lighting(images, generator, config.lighting_std)
    if config.cutmix_prob > 0.0:
        return cutmix(images, labels, generator, config.cutmix_beta, config.cutmix_prob)
    kept = torch.ones((), device=images.device)
    return images, labels, labels, kept
