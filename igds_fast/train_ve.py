"""Train the variational estimator (VE): MoCo v2 instance discrimination + CMI term, then a linear probe.

IGDS_SPEC section 2 ("Training the VE", paper section 4.1.3, eq. 24, Algorithm 1):

    L_VE(theta) = L_InfoNCE(theta) - lambda * E_{x,y}[ KL(P_x || Q_y) ]        (minimised)

    P_x = softmax(f_theta(x) / tau)   over the d trunk-feature coordinates        [B, d]
    Q_y = E[P_X | Y = y]              class centroids, re-estimated while theta trains, detached

lambda = 0 is plain MoCo v2. Stages:

1. Contrastive training of the query encoder f_theta (a torchvision-compatible ResNet trunk, ReLU
   replaced by Softplus(beta_sp)) with an MLP projection head, a momentum key encoder + head, and
   a queue of K negative keys (He et al. 2020; Chen et al. 2020, MoCo v2):

       q = normalize(g_q(f_q(view1)))   k = normalize(g_k(f_k(view2)))      [B, moco_dim]
       L_InfoNCE = -mean log( exp(q.k / tau_c) / (exp(q.k / tau_c) + sum_j exp(q.queue_j / tau_c)) )

   Two random views per image: random-resized crop (+ optional flip) and a small brightness /
   contrast (/ saturation for RGB) jitter, all batched tensor ops drawn from one seeded generator.
   Queue entries remember which image they came from; entries of the query's own image are masked
   out of its negatives (on small data sets the queue would otherwise hold the query's own image
   from an earlier epoch as a "negative"). "Shuffle BN" is emulated on one device: queries run
   through BatchNorm in `bn_splits` groups in batch order, keys in `bn_splits` groups of a shuffled
   order, so a query and its positive key never share batch statistics (MoCo's guard against the
   batch-statistics shortcut).
   The CMI term uses the query's trunk features z = f_q(view1) (what guidance differentiates),
   with Q as an EMA of per-batch class means of P (`centroid_update="ema"`, default) or re-estimated
   over the whole (un-augmented) training set at the start of every epoch (`"epoch"`).
2. Freeze f_theta; recompute its BatchNorm running statistics on the un-augmented training images
   (the VE sees clean images; the statistics gathered during training describe augmented views).
3. Linear classifier (W, b) on the frozen features: full-batch multinomial logistic regression
   (L-BFGS by default) on standardised features, folded back so logits = z W^T + b exactly.
4. log Q over the training images with the frozen encoder (`compute_log_centroids`), then the
   `VariationalEstimator` bundle.

Report (nats): prototype information I(X;Y) ~ H(Y) - CE and contextual information
H(X|Y) ~ E KL(P_x || Q_y), on the training data and on held-out data if given.

Data: tensors in memory (`train_ve`) or an ImageFolder streamed batch by batch
(`train_ve_from_source` with `igds_fast.data.FolderImages`): an epoch is one pass of a DataLoader
over the permutation drawn from the seeded generator, exactly the batches of the in-memory loop,
so both give the same bundle bit for bit. Every pass over the whole set (BN statistics, features,
centroids) is batch by batch; nothing of size N x image is held for a streamed set.
Memory: the frozen features of the whole training set ([N, d] float32) are held once for the
full-batch classifier (13k ImageNette images x 2048 = 107 MB; 1.28M ImageNet images x 2048 = 10.5 GB).

Resume: with a checkpoint path, the contrastive stage writes its whole state (encoders, heads,
queue, centroids, optimiser, generator) atomically after every epoch; a rerun with the same config
and data continues after the last finished epoch and ends with the same bundle as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import numbers
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .artifacts import parse_json_header, read_safetensors
from .data import FolderImages, TensorImages, check_labelled_images
from .devices import resolve_device
from .errors import IGDSInputError
from .evaluate.augment import crop_and_flip
from .guidance.objective import centroid_kl, contextual_kl
from .threads import cpu_threads, torch_threads
from .models.resnet import ARCHS, NORMS, ResNet, build_resnet, load_moco_encoder
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess
from .ve import VariationalEstimator, compute_log_centroids

CENTROID_UPDATES = ("ema", "epoch")
OPTIMIZERS = ("sgd", "adam")
CLASSIFIER_OPTIMIZERS = ("lbfgs", "adam")
INIT_SCHEMES = ("none", "moco")
# Largest resolution at which a ResNet's last stage is 1x1 (stem /4, then /2 three times,
# ceil-rounded): instance norm of a 1x1 map is a constant, so such a trunk outputs constants.
_LAST_STAGE_1X1_MAX_RESOLUTION = 32
_FEATURE_BATCH = 256  # images per no-grad forward when extracting features / BN statistics
CHECKPOINT_FORMAT = "igds_ve_checkpoint"
CHECKPOINT_VERSION = 1
_CHECKPOINT_KEY = "igds_ve_checkpoint"


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def parse_init(init: str) -> tuple[str, str | None]:
    """'none' -> ('none', None); 'moco:PATH' -> ('moco', PATH). Anything else: IGDSInputError."""
    if not isinstance(init, str):
        raise IGDSInputError(f"init must be a string ('none' or 'moco:PATH'), got {init!r}")
    if init == "none":
        return "none", None
    scheme, sep, path = init.partition(":")
    if not sep or scheme not in INIT_SCHEMES or scheme == "none":
        raise IGDSInputError(f"unknown init scheme {init!r}; use 'none' or 'moco:PATH'")
    if not path:
        raise IGDSInputError("init 'moco:' needs a checkpoint path after the colon (moco:PATH)")
    return scheme, path


@dataclass
class VETrainConfig:
    """Every knob of VE training; validated on construction (one-line IGDSInputError).

    Encoder: arch ("resnet18" | "resnet50"), in_channels (1 or 3 for image folders), softplus_beta
    (None = ReLU), norm ("batch" | "instance"), resolution (encoder input side), mean / std (per
    channel, [0, 1] units; None = ImageNet statistics with a MoCo init, else the training images'
    own statistics). tau: temperature of P_x = softmax(z / tau).
    MoCo: moco_dim (projection size), mlp_hidden (None = feature dim), queue_size (clipped to the
    training-set size), moco_momentum (key encoder EMA), moco_temperature (tau_c), bn_splits
    (shuffle-BN groups; 1 = off).
    CMI term: lambda_cmi (0 = plain MoCo), centroid_update ("ema" per batch | "epoch"),
    centroid_momentum (EMA weight of the old Q; 0 = Q is the current batch's class means).
    Optimisation: epochs (0 = keep the initial encoder, train only the classifier), batch_size,
    optimizer ("sgd" with momentum 0.9 | "adam"), lr (cosine-decayed per step; default 0.03, MoCo
    v2's SGD rate for batch 256), weight_decay. Views: crop_scale (random-resized-crop area range), horizontal_flip, jitter
    (brightness/contrast/saturation strength; 0 = off).
    Classifier: classifier_optimizer ("lbfgs" | "adam"), classifier_epochs (full-batch iterations),
    classifier_lr, classifier_weight_decay (L2 on the standardised-feature weights).
    recompute_bn_stats: re-estimate BatchNorm statistics on clean training images after training.
    seed, device (None = cuda if available), init ("none" | "moco:PATH").
    num_threads (CPU only): torch intra-op threads while training; None = 1 thread for small work
    (igds_fast.threads.SMALL_WORK_LIMIT of batch x resolution^2 x 64; the digits VE measured
    0.65 s per forward + backward on one thread, 1.7-9.4 s on two busy cores), else the process setting. Restored afterwards.
    """

    arch: str = "resnet18"
    in_channels: int = 3
    softplus_beta: float | None = 3.0
    norm: str = "batch"
    resolution: int = 32
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    tau: float = 1.0
    moco_dim: int = 128
    mlp_hidden: int | None = None
    queue_size: int = 4096
    moco_momentum: float = 0.999
    moco_temperature: float = 0.2
    bn_splits: int = 4
    lambda_cmi: float = 0.0
    centroid_update: str = "ema"
    centroid_momentum: float = 0.9
    epochs: int = 20
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.03
    weight_decay: float = 1e-4
    crop_scale: tuple[float, float] = (0.3, 1.0)
    horizontal_flip: bool = True
    jitter: float = 0.2
    classifier_optimizer: str = "lbfgs"
    classifier_epochs: int = 100
    classifier_lr: float = 1.0
    classifier_weight_decay: float = 1e-3
    recompute_bn_stats: bool = True
    seed: int = 0
    device: str | None = None
    init: str = "none"
    num_threads: int | None = None

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise IGDSInputError(f"unknown arch {self.arch!r}; available: {', '.join(ARCHS)}")
        if self.norm not in NORMS:
            raise IGDSInputError(f"unknown norm {self.norm!r}; available: {', '.join(NORMS)}")
        for name in ("in_channels", "resolution", "moco_dim", "queue_size", "batch_size", "bn_splits"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise IGDSInputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("epochs", "classifier_epochs", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise IGDSInputError(f"{name} must be a non-negative integer, got {value!r}")
        if self.classifier_epochs < 1:
            raise IGDSInputError("classifier_epochs must be >= 1 (the classifier must be trained)")
        if self.batch_size < 2:
            raise IGDSInputError(f"batch_size must be >= 2 (BatchNorm and InfoNCE need pairs), got {self.batch_size}")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            raise IGDSInputError(f"num_threads must be a positive integer or None, got {self.num_threads!r}")
        if self.mlp_hidden is not None and (not _is_int(self.mlp_hidden) or self.mlp_hidden < 1):
            raise IGDSInputError(f"mlp_hidden must be a positive integer or None, got {self.mlp_hidden!r}")
        if self.softplus_beta is not None and (not _is_real(self.softplus_beta) or self.softplus_beta <= 0):
            raise IGDSInputError(f"softplus_beta must be a positive finite number or None, got {self.softplus_beta!r}")
        for name in ("tau", "moco_temperature", "lr", "classifier_lr"):
            value = getattr(self, name)
            if not _is_real(value) or value <= 0:
                raise IGDSInputError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("lambda_cmi", "weight_decay", "classifier_weight_decay", "jitter"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise IGDSInputError(f"{name} must be a non-negative finite number, got {value!r}")
        if self.jitter >= 1:
            raise IGDSInputError(f"jitter must be < 1 (a contrast factor 1 - jitter must stay positive), got {self.jitter}")
        for name in ("moco_momentum", "centroid_momentum"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < 1:
                raise IGDSInputError(f"{name} must be in [0, 1), got {value!r}")
        if self.centroid_update not in CENTROID_UPDATES:
            raise IGDSInputError(f"centroid_update must be one of {CENTROID_UPDATES}, got {self.centroid_update!r}")
        if self.optimizer not in OPTIMIZERS:
            raise IGDSInputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.classifier_optimizer not in CLASSIFIER_OPTIMIZERS:
            raise IGDSInputError(
                f"classifier_optimizer must be one of {CLASSIFIER_OPTIMIZERS}, got {self.classifier_optimizer!r}"
            )
        try:
            low, high = (float(v) for v in self.crop_scale)
        except (TypeError, ValueError) as exc:
            raise IGDSInputError(f"crop_scale must be two numbers (low, high), got {self.crop_scale!r}") from exc
        if not 0 < low <= high <= 1:
            raise IGDSInputError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale!r}")
        self.crop_scale = (low, high)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError) as exc:
                raise IGDSInputError(f"{name} must be a sequence of numbers, got {value!r}") from exc
            if len(value) != self.in_channels:
                raise IGDSInputError(f"{name} has {len(value)} values for {self.in_channels} channel(s)")
            if not all(math.isfinite(v) for v in value) or (name == "std" and min(value) <= 0):
                raise IGDSInputError(f"{name} must be finite{' and positive' if name == 'std' else ''}, got {value}")
            setattr(self, name, value)
        if (self.mean is None) != (self.std is None):
            raise IGDSInputError("give both mean and std, or neither (then they are chosen automatically)")
        if self.norm == "instance" and self.resolution <= _LAST_STAGE_1X1_MAX_RESOLUTION:
            raise IGDSInputError(
                f"norm 'instance' needs resolution > {_LAST_STAGE_1X1_MAX_RESOLUTION}: at {self.resolution} the "
                "last ResNet stage is 1x1 and instance norm would make every feature constant"
            )
        scheme, path = parse_init(self.init)
        if scheme == "moco":
            if self.in_channels != 3:
                raise IGDSInputError(f"a MoCo init is an RGB encoder; in_channels must be 3, got {self.in_channels}")
            if not os.path.isfile(path):
                raise IGDSInputError(f"MoCo checkpoint not found: {path}")

    @classmethod
    def digits(cls, **overrides) -> "VETrainConfig":
        """The built-in small VE: ResNet-18 on 16x16 grayscale digits, ~70 s on 2 busy CPU cores.

        Choices, measured on sklearn digits (1257 train / 540 held-out images):
        * Adam 2e-3, batch 128 (9 steps per epoch), 15 epochs: SGD at MoCo's 0.03-0.06 barely
          moves InfoNCE from chance (log 1025) in this few steps; Adam reaches ~4.6.
        * Key-encoder momentum 0.99: MoCo's 0.999 would leave the key encoder at its random
          initialisation over ~135 steps.
        * Mild views (crop area 0.6-1, jitter 0.1, no flips: digits are not mirror symmetric): on
          16x16 images MoCo v2's 0.2-1 crops erase the digit; the mild views gave the best
          held-out linear-probe accuracy (94.1% vs 91.5% with 0.3-1 crops and jitter 0.2).
        * lambda_cmi 0.01: the CMI term on, as IGDS trains its VE; it doubles E KL(P || Q_y)
          (0.46 -> 0.90 nats) at no accuracy cost, while lambda 0.1 inflates the feature scale
          (E KL 2.7 nats) and costs ~5 points of held-out accuracy.
        * Queue 1024 of the 1257 images; bn_splits 2 (shuffle BN at ~15% extra time).
        """
        settings = dict(
            arch="resnet18", in_channels=1, resolution=16, epochs=15, batch_size=128, queue_size=1024,
            moco_momentum=0.99, horizontal_flip=False, crop_scale=(0.6, 1.0), jitter=0.1, optimizer="adam",
            lr=2e-3, bn_splits=2, lambda_cmi=0.01,
        )
        settings.update(overrides)
        return cls(**settings)

    def to_dict(self) -> dict:
        """A JSON-serialisable copy (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# ---- pieces of the objective ----------------------------------------------------------------------


def label_entropy(labels: torch.Tensor, num_classes: int) -> float:
    """H(Y) in nats of the empirical label distribution: -sum_c p_c log p_c, p_c = count_c / N."""
    counts = torch.bincount(labels.to(torch.long).cpu(), minlength=num_classes).to(torch.float64)
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * probabilities.log()).sum())


def feature_log_softmax(features: torch.Tensor, tau: float) -> torch.Tensor:
    """log P_x = log softmax(z / tau) over the d coordinates; z [B, d] -> [B, d]."""
    return torch.log_softmax(features / tau, dim=1)


def cmi_term(features: torch.Tensor, labels: torch.Tensor, log_q: torch.Tensor, tau: float) -> torch.Tensor:
    """E[KL(P_x || Q_y)] over a batch (0-dim, differentiable in `features`; log_q is a constant).

    The VE loss subtracts lambda times this, so gradient descent on the loss moves the features
    *up* this term: each sample's feature softmax moves away from its class centroid.
    """
    return contextual_kl(features, labels, log_q.detach(), tau).mean()


@torch.no_grad()
def update_log_centroids(
    log_q: torch.Tensor, seen: torch.Tensor, log_p: torch.Tensor, labels: torch.Tensor, momentum: float
) -> None:
    """EMA of the class centroids in log space, in place: for every class c present in the batch,

        Q_c <- momentum * Q_c + (1 - momentum) * mean_{i: y_i = c} P_i      (Q_c <- batch mean if c unseen)

    log_q [C, d] float, seen [C] bool, log_p [B, d] (detached here), labels [B]. Log space
    (logsumexp) so that small tau, where P underflows, keeps finite centroids.
    """
    num_classes = log_q.shape[0]
    log_p = log_p.detach().to(log_q.dtype)
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    # Per-class logsumexp of log P: max-shifted scatter sum.
    index = labels[:, None].expand_as(log_p)
    class_max = torch.full_like(log_q, -math.inf).scatter_reduce(0, index, log_p, reduce="amax", include_self=True)
    shift = torch.where(present[:, None], class_max, torch.zeros_like(class_max))
    sums = torch.zeros_like(log_q).index_add_(0, labels, torch.exp(log_p - shift[labels]))
    batch_log_mean = shift + torch.log(sums) - torch.log(counts.clamp_min(1).to(log_q.dtype))[:, None]
    if momentum > 0:
        blended = torch.logaddexp(log_q + math.log(momentum), batch_log_mean + math.log1p(-momentum))
    else:
        blended = batch_log_mean
    fresh = present & ~seen  # first sighting: the batch mean, whatever the momentum
    updated = torch.where(fresh[:, None], batch_log_mean, blended)
    log_q.copy_(torch.where(present[:, None], updated, log_q))
    seen |= present


def info_nce_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    query_ids: torch.Tensor | None = None,
    queue_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo's InfoNCE: queries, keys [B, D] (L2-normalised), queue [K, D] (normalised negatives).

    logits_i = [q_i.k_i, q_i.queue_1, ..., q_i.queue_K] / temperature; loss = CE(logits, 0).
    Queue entries with queue_ids == query_ids[i] (the query's own image) are excluded from row i.
    """
    positive = (queries * keys).sum(dim=1, keepdim=True)
    negative = queries @ queue.t()
    if query_ids is not None and queue_ids is not None:
        negative = negative.masked_fill(query_ids[:, None] == queue_ids[None, :], -math.inf)
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device))


def prototype_information(logits: torch.Tensor, labels: torch.Tensor, entropy: float) -> tuple[float, float]:
    """(H(Y) - CE, CE): the prototype information estimate and the mean cross-entropy (nats).

    logits [N, C], labels [N]; CE = mean_i -log softmax(logits_i)_{y_i}.
    """
    cross_entropy = float(F.cross_entropy(logits.to(torch.float64), labels.to(torch.long)))
    return entropy - cross_entropy, cross_entropy


# ---- views ----------------------------------------------------------------------------------------


def random_view(images: torch.Tensor, generator: torch.Generator, config: VETrainConfig) -> torch.Tensor:
    """One random view of each image: crop (+ flip) then jitter; [B, C, H, W] in [-1, 1] -> same shape.

    Jitter (strength j, per image): contrast c ~ U(1-j, 1+j) about the image mean, brightness
    b ~ U(-j, j) (in [-1, 1] units, i.e. +-j/2 of the [0, 1] range), and for RGB a saturation
    s ~ U(1-j, 1+j) (blend with the luma image). Clamped back to [-1, 1].
    """
    views = crop_and_flip(images, generator, scale=config.crop_scale, crop=True, flip=config.horizontal_flip)
    strength = config.jitter
    if strength <= 0:
        return views
    batch = images.shape[0]
    device = generator.device

    def uniform(low, high):
        return (torch.rand(batch, generator=generator, device=device) * (high - low) + low).view(-1, 1, 1, 1)

    contrast, brightness = uniform(1 - strength, 1 + strength), uniform(-strength, strength)
    if images.shape[1] == 3:
        saturation = uniform(1 - strength, 1 + strength).to(views.device)
        luma = (0.299 * views[:, 0:1] + 0.587 * views[:, 1:2] + 0.114 * views[:, 2:3])
        views = luma + saturation * (views - luma)
    image_mean = views.mean(dim=(1, 2, 3), keepdim=True)
    views = (views - image_mean) * contrast.to(views.device) + image_mean + brightness.to(views.device)
    return views.clamp(-1.0, 1.0)


# ---- models ---------------------------------------------------------------------------------------


class ProjectionHead(nn.Sequential):
    """MoCo v2's MLP head: Linear(d, hidden) -> ReLU -> Linear(hidden, moco_dim). [B, d] -> [B, moco_dim]."""

    def __init__(self, feature_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


@contextlib.contextmanager
def _frozen_bn_statistics(module: nn.Module):
    """Train-mode BatchNorm (batch statistics) that leaves the running statistics untouched.

    running = (1 - momentum) * running + momentum * batch, so momentum 0 keeps them as they are.
    """
    saved = [(m, m.momentum) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def _as_source(images):
    """A FolderImages / TensorImages as it is; a tensor [N, C, H, W] wrapped (labels unused: zeros)."""
    if isinstance(images, (FolderImages, TensorImages)):
        return images
    return TensorImages(images, torch.zeros(images.shape[0], dtype=torch.long))


@torch.no_grad()
def recompute_batchnorm_statistics(encoder: ResNet, preprocess: EncoderPreprocess, images, device) -> None:
    """Replace the BatchNorm running statistics by their exact average over `images` (clean, in [-1, 1]).

    images: a tensor [N, C, H, W] or a FolderImages / TensorImages source (streamed batch by batch).

    Cumulative averaging (momentum None) over batches of `_FEATURE_BATCH`; a last batch of one image
    is merged into the previous one (BatchNorm needs two values per channel at 1x1 maps).
    """
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    encoder.train()
    source = _as_source(images)
    try:
        for batch, _, _ in source.batches(_even_chunks(len(source), _FEATURE_BATCH), device):
            encoder.forward_features(preprocess(batch))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        encoder.eval()


def _even_chunks(count: int, batch_size: int) -> list[slice]:
    """Contiguous slices of about `batch_size` covering 0..count, none smaller than min(2, count)."""
    number = max(1, math.ceil(count / batch_size))
    bounds = [round(i * count / number) for i in range(number + 1)]
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(slices) > 1 and slices[-1].stop - slices[-1].start < 2:
        slices[-2:] = [slice(slices[-2].start, slices[-1].stop)]
    return slices


@torch.no_grad()
def extract_features(encoder: ResNet, preprocess: EncoderPreprocess, images, device) -> torch.Tensor:
    """Frozen-encoder features z [N, d] (float32, on `device`) of images [N, C, H, W] in [-1, 1]
    (a tensor, or a FolderImages / TensorImages source streamed batch by batch)."""
    encoder.eval()
    source = _as_source(images)
    parts = [encoder.forward_features(preprocess(batch)).float()
             for batch, _, _ in source.batches(_even_chunks(len(source), _FEATURE_BATCH), device)]
    return torch.cat(parts)


def fit_linear_classifier(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    iterations: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-3,
    optimizer: str = "lbfgs",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on frozen features: (W [C, d], b [C]) with logits = z W^T + b.

    Trained full batch on standardised features u = (z - mu) / sigma (per coordinate; a constant
    coordinate keeps sigma 1) for a well-conditioned problem, minimising
    mean CE(u V^T + c, y) + weight_decay / 2 * ||V||^2, then folded back exactly:
    W = V / sigma, b = c - W mu. L-BFGS (strong Wolfe line search, step `lr`) or Adam (`lr`),
    `iterations` steps; V starts at zero (the optimum is unique, so the start only affects speed).
    """
    features = features.to(torch.float32)
    labels = labels.to(device=features.device, dtype=torch.long)
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))
    standardised = (features - mean) / std
    weight = torch.zeros(num_classes, features.shape[1], device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)

    def objective():
        loss = F.cross_entropy(F.linear(standardised, weight, bias), labels)
        return loss + 0.5 * weight_decay * weight.square().sum()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if optimizer == "lbfgs":
            solver = torch.optim.LBFGS(
                [weight, bias], lr=lr, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                tolerance_grad=1e-9, tolerance_change=1e-12,
            )

            def closure():
                solver.zero_grad()
                loss = objective()
                loss.backward()
                return loss

            solver.step(closure)
        elif optimizer == "adam":
            solver = torch.optim.Adam([weight, bias], lr=lr)
            for _ in range(iterations):
                solver.zero_grad()
                objective().backward()
                solver.step()
        else:
            raise IGDSInputError(f"classifier optimizer must be one of {CLASSIFIER_OPTIMIZERS}, got {optimizer!r}")
    with torch.no_grad():
        folded_weight = weight / std
        folded_bias = bias - folded_weight @ mean
    return folded_weight.detach(), folded_bias.detach()


def image_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of images [N, C, H, W] in [-1, 1] (float64 sums)."""
    unit = (images.to(torch.float64) + 1.0) * 0.5
    mean = unit.mean(dim=(0, 2, 3))
    std = unit.std(dim=(0, 2, 3), unbiased=False)
    if bool((std <= 1e-6).any()):
        raise IGDSInputError("the training images have a constant channel (std 0): give mean/std explicitly")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# ---- training -------------------------------------------------------------------------------------


def _build_encoder(config: VETrainConfig) -> ResNet:
    scheme, path = parse_init(config.init)
    if scheme == "moco":
        encoder = load_moco_encoder(path, arch=config.arch, softplus_beta=config.softplus_beta, norm=config.norm)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            encoder = build_resnet(config.arch, num_classes=None, softplus_beta=config.softplus_beta,
                                   norm=config.norm, in_channels=config.in_channels)
    return encoder


class _MoCoTrainer:
    """The contrastive stage (state: encoders, heads, queue, centroids, optimiser)."""

    def __init__(self, encoder: ResNet, preprocess: EncoderPreprocess, config: VETrainConfig, num_classes: int,
                 num_images: int, device: torch.device, log: Callable[[str], None]):
        self.config = config
        self.device = device
        self.preprocess = preprocess
        self.encoder_q = encoder.to(device).train()
        dim = encoder.feature_dim
        hidden = config.mlp_hidden or dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            self.head_q = ProjectionHead(dim, hidden, config.moco_dim).to(device)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.head_k = copy.deepcopy(self.head_q).requires_grad_(False)
        self.query_params = list(self.encoder_q.parameters()) + list(self.head_q.parameters())
        self.key_params = list(self.encoder_k.parameters()) + list(self.head_k.parameters())

        self.batch_size = min(config.batch_size, num_images)
        # More queue entries than images would only repeat images among the negatives.
        self.queue_size = min(config.queue_size, num_images)
        if self.queue_size < config.queue_size:
            log(f"train-ve: queue clipped from {config.queue_size} to {self.queue_size} (the training-set size)")
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        # Random unit vectors until real keys arrive (as MoCo), id -1 = no image.
        self.queue = F.normalize(torch.randn(self.queue_size, config.moco_dim, generator=self.generator, device=device), dim=1)
        self.queue_ids = torch.full((self.queue_size,), -1, dtype=torch.long, device=device)
        self.queue_pointer = 0

        self.log_q = torch.zeros(num_classes, dim, device=device)
        self.seen = torch.zeros(num_classes, dtype=torch.bool, device=device)

        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.query_params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(self.query_params, lr=config.lr, weight_decay=config.weight_decay)

    def _groups(self, batch: int) -> int:
        # BatchNorm needs >= 2 samples per group (layer4 maps can be 1x1); instance norm needs no split.
        if self.encoder_q.norm != "batch":
            return 1
        return max(1, min(self.config.bn_splits, batch // 2))

    def _encode_query(self, views: torch.Tensor, groups: int) -> torch.Tensor:
        chunks = views.tensor_split(groups)
        return torch.cat([self.encoder_q.forward_features(self.preprocess(chunk)) for chunk in chunks])

    @torch.no_grad()
    def _encode_keys(self, views: torch.Tensor, groups: int) -> torch.Tensor:
        shuffle = torch.randperm(views.shape[0], generator=self.generator, device=self.device)
        shuffled = views[shuffle]
        keys = torch.cat([self.head_k(self.encoder_k.forward_features(self.preprocess(chunk)))
                          for chunk in shuffled.tensor_split(groups)])
        return F.normalize(keys[torch.argsort(shuffle)], dim=1)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        torch._foreach_lerp_(self.key_params, self.query_params, 1.0 - self.config.moco_momentum)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        count = min(keys.shape[0], self.queue_size)
        keys, ids = keys[-count:], ids[-count:]
        positions = (self.queue_pointer + torch.arange(count, device=self.device)) % self.queue_size
        self.queue[positions] = keys
        self.queue_ids[positions] = ids
        self.queue_pointer = (self.queue_pointer + count) % self.queue_size

    @torch.no_grad()
    def estimate_centroids_over(self, source) -> None:
        """Q over the whole (un-augmented) set with the current query encoder ("epoch" mode), streamed."""
        from .ve import LogCentroidAccumulator

        accumulator = LogCentroidAccumulator(self.log_q.shape[0], self.config.tau)
        with _frozen_bn_statistics(self.encoder_q):
            for images, labels, _ in source.batches(_even_chunks(len(source), _FEATURE_BATCH), self.device):
                features = self.encoder_q.forward_features(self.preprocess(images))
                accumulator.update(features.float(), labels.to(torch.long))
        self.log_q.copy_(accumulator.compute(torch.float32))
        self.seen.fill_(True)

    # ---- checkpoints (one safetensors file, written atomically after every epoch) ----------------

    _MODULES = ("encoder_q", "head_q", "encoder_k", "head_k")

    def save_checkpoint(self, path: str, key: dict, epoch: int, step: int, history: list[dict]) -> None:
        from safetensors.torch import save as safetensors_bytes

        from .imageio import write_bytes_atomic

        tensors = {}
        for name in self._MODULES:
            for k, v in getattr(self, name).state_dict().items():
                tensors[f"{name}.{k}"] = v
        tensors.update(queue=self.queue, queue_ids=self.queue_ids, log_q=self.log_q, seen=self.seen,
                       generator_state=self.generator.get_state())
        optimizer_state = self.optimizer.state_dict()
        scalars = {}
        for index, state in optimizer_state["state"].items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optimizer.{index}.{k}"] = v
                else:
                    scalars[f"{index}.{k}"] = v
        header = {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "key": key, "epoch": epoch,
            "step": step, "queue_pointer": self.queue_pointer, "history": history,
            "param_groups": optimizer_state["param_groups"], "optimizer_scalars": scalars,
        }
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        write_bytes_atomic(path, safetensors_bytes(tensors, metadata={_CHECKPOINT_KEY: json.dumps(header)}))

    def load_checkpoint(self, path: str, key: dict) -> tuple[int, int, list[dict]]:
        """Restore the state saved after an epoch; returns (epochs done, steps done, history)."""
        metadata, tensors = read_safetensors(path, "VE training checkpoint", with_tensors=True)
        header = parse_json_header(metadata, path, _CHECKPOINT_KEY, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                                   "VE training checkpoint")
        if header.get("key") != json.loads(json.dumps(key)):
            saved = header.get("key") or {}
            differs = sorted(k for k in set(saved) | set(key) if saved.get(k) != json.loads(json.dumps(key.get(k))))
            raise IGDSInputError(
                f"checkpoint {path} belongs to another run ({', '.join(differs)} differ); delete it to start afresh"
            )
        try:
            for name in self._MODULES:
                module = getattr(self, name)
                prefix = f"{name}."
                module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            with torch.no_grad():
                for name in ("queue", "queue_ids", "log_q", "seen"):
                    getattr(self, name).copy_(tensors[name])
            self.generator.set_state(tensors["generator_state"])
            state: dict = {}
            for k, v in tensors.items():
                if k.startswith("optimizer."):
                    _, index, field = k.split(".", 2)
                    state.setdefault(int(index), {})[field] = v
            for k, v in header["optimizer_scalars"].items():
                index, field = k.split(".", 1)
                state.setdefault(int(index), {})[field] = v
            self.optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
            self.queue_pointer = int(header["queue_pointer"])
            return int(header["epoch"]), int(header["step"]), list(header["history"])
        except (KeyError, RuntimeError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise IGDSInputError(f"checkpoint {path} does not fit this run: {reason}") from exc

    def train(self, source, log: Callable[[str], None], checkpoint: str | None = None,
              key: dict | None = None, progress: bool = False) -> list[dict]:
        """The contrastive epochs over `source` (FolderImages or TensorImages): one shuffled pass each."""
        from .progress import Progress

        config = self.config
        self.labels = source.labels.to(self.device, torch.long)
        count = len(source)
        steps_per_epoch = count // self.batch_size  # batches of batch_size .. 2*batch_size-1, none tiny
        total_steps = config.epochs * steps_per_epoch
        history: list[dict] = []
        step = start_epoch = 0
        if checkpoint is not None and os.path.exists(checkpoint):
            start_epoch, step, history = self.load_checkpoint(checkpoint, key)
            log(f"train-ve: resumed from {checkpoint} after epoch {start_epoch}/{config.epochs}")
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            if config.centroid_update == "epoch":
                self.estimate_centroids_over(source)
            order = torch.randperm(count, generator=self.generator, device=self.device)
            sums = {"infonce": 0.0, "kl": 0.0, "loss": 0.0}
            bar = Progress(total=count, unit="img", label=f"train-ve epoch {epoch + 1}/{config.epochs}", enabled=progress)
            for images, labels, batch_ids in source.batches(order.tensor_split(steps_per_epoch), self.device):
                lr = config.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                terms = self._step(images, labels.to(torch.long), batch_ids.to(self.device))
                for name in sums:
                    sums[name] += terms[name]
                step += 1
                bar.update(images.shape[0])
            bar.close()
            record = {k: v / steps_per_epoch for k, v in sums.items()}
            record.update(epoch=epoch + 1, seconds=round(time.perf_counter() - started, 3))
            history.append(record)
            if checkpoint is not None:
                self.save_checkpoint(checkpoint, key, epoch + 1, step, history)
            log(f"train-ve: epoch {epoch + 1}/{config.epochs} InfoNCE {record['infonce']:.4f} "
                f"KL(P||Q_y) {record['kl']:.4f} loss {record['loss']:.4f} ({record['seconds']:.1f}s)")
        return history

    def _step(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> dict:
        config = self.config
        view_q = random_view(images, self.generator, config)
        view_k = random_view(images, self.generator, config)
        groups = self._groups(images.shape[0])
        features = self._encode_query(view_q, groups)
        queries = F.normalize(self.head_q(features), dim=1)
        self._momentum_update()
        keys = self._encode_keys(view_k, groups)
        infonce = info_nce_loss(queries, keys, self.queue, config.moco_temperature, ids, self.queue_ids)
        log_p = feature_log_softmax(features, config.tau)
        if config.centroid_update == "ema":
            # Update first, then use: every class in the batch has a centroid, and with momentum 0
            # Q_y is exactly this batch's class mean.
            update_log_centroids(self.log_q, self.seen, log_p, labels, config.centroid_momentum)
        kl = centroid_kl(log_p, self.log_q.detach(), labels).mean()
        loss = infonce - config.lambda_cmi * kl if config.lambda_cmi > 0 else infonce
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._enqueue(keys, ids)
        return {"infonce": float(infonce.detach()), "kl": float(kl.detach()), "loss": float(loss.detach())}


def _split_report(ve_parts, features, labels, entropy) -> dict:
    weight, bias, log_q, tau = ve_parts
    logits = F.linear(features, weight, bias)
    information, cross_entropy = prototype_information(logits, labels, entropy)
    kl = contextual_kl(features.double(), labels.long(), log_q.double(), tau)
    return {
        "images": int(features.shape[0]),
        "accuracy": float((logits.argmax(dim=1) == labels).double().mean() * 100.0),
        "cross_entropy": cross_entropy,
        "prototype_information": information,
        "contextual_information": float(kl.mean()),
    }


def _train_stages(train, val, class_names, config, encoder, preprocess, mean, std, device, log,
                  checkpoint=None, progress=False) -> tuple[VariationalEstimator, dict]:
    """Contrastive stage, BN statistics, features, classifier, centroids, report (see `train_ve`).

    train / val: FolderImages or TensorImages sources (val may be None)."""
    num_classes = len(class_names)
    history: list[dict] = []
    effective = {"batch_size": None, "queue_size": None}
    contrastive_seconds = 0.0
    train_labels = train.labels.to(torch.long)
    if config.epochs > 0:
        stage = time.perf_counter()
        trainer = _MoCoTrainer(encoder, preprocess, config, num_classes, len(train), device, log)
        effective = {"batch_size": trainer.batch_size, "queue_size": trainer.queue_size}
        key = None
        if checkpoint is not None:
            run_config = config.to_dict()
            for volatile in ("device", "num_threads"):  # where it runs, not what it computes
                run_config.pop(volatile)
            key = {"config": run_config, "device_type": device.type, "data": train.fingerprint(),
                   "classes": list(class_names), "mean": list(mean), "std": list(std)}
        history = trainer.train(train, log, checkpoint=checkpoint, key=key, progress=progress)
        encoder = trainer.encoder_q
        del trainer
        contrastive_seconds = time.perf_counter() - stage
    encoder = encoder.to(device).eval().requires_grad_(False)

    stage = time.perf_counter()
    if config.recompute_bn_stats and config.epochs > 0:
        recompute_batchnorm_statistics(encoder, preprocess, train, device)
    train_features = extract_features(encoder, preprocess, train, device)
    weight, bias = fit_linear_classifier(
        train_features, train_labels.to(device), num_classes, config.classifier_epochs, config.classifier_lr,
        config.classifier_weight_decay, config.classifier_optimizer, config.seed,
    )
    log_q = compute_log_centroids(train_features, train_labels.to(device), num_classes, config.tau)
    classifier_seconds = time.perf_counter() - stage

    ve = VariationalEstimator(encoder.cpu(), weight.cpu(), bias.cpu(), log_q.cpu(), config.tau,
                              EncoderPreprocess(config.resolution, mean, std), class_names)
    entropy = label_entropy(train_labels, num_classes)
    parts = (weight, bias, log_q, config.tau)
    report = {
        "config": config.to_dict(),
        "class_names": class_names,
        "mean": list(mean),
        "std": list(std),
        "device": str(device),
        "effective": effective,
        "history": history,
        "units": "nats",
        "label_entropy": entropy,
        "train": _split_report(parts, train_features, train_labels.to(device), entropy),
        "seconds": {"contrastive": round(contrastive_seconds, 3), "classifier_and_centroids": round(classifier_seconds, 3)},
    }
    del train_features
    if val is not None:
        val_features = extract_features(ve.encoder.to(device), preprocess, val, device)
        ve.encoder.cpu()
        report["val"] = _split_report(parts, val_features, val.labels.to(device, torch.long), entropy)
    return ve, report


def train_ve(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    class_names: Sequence[str],
    config: VETrainConfig | None = None,
    val_images: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    log: Callable[[str], None] = print,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[VariationalEstimator, dict]:
    """Train a VE (contrastive + CMI encoder, linear classifier, centroids) and report its estimates.

    train_images [N, C, H, W] float in [-1, 1], train_labels [N] int in [0, len(class_names));
    every class needs a training image. val_images / val_labels: optional held-out data of the same
    classes, only evaluated. Returns (VariationalEstimator on CPU, report) where report holds the
    config, the effective mean/std / batch / queue sizes, the per-epoch history, H(Y) (nats) and for
    "train" (and "val") accuracy (%), cross-entropy, prototype_information = H(Y) - CE and
    contextual_information = E KL(P_x || Q_y) (nats), and the wall time per stage.
    checkpoint: a file the contrastive stage saves itself to after every epoch and resumes from
    (see the module docstring); progress: a per-epoch progress bar on stderr.
    All input defects raise a one-line IGDSInputError before any training.
    For an ImageFolder streamed from disk use :func:`train_ve_from_source`.
    """
    if (val_images is None) != (val_labels is None):
        raise IGDSInputError("give both val_images and val_labels, or neither")
    train = TensorImages(train_images, train_labels)
    val = None if val_images is None else TensorImages(val_images, val_labels)
    return train_ve_from_source(train, class_names, config, val, log=log, checkpoint=checkpoint, progress=progress)


def _check_source(source, class_names, in_channels: int, what: str, require_every_class: bool) -> list[str]:
    """A FolderImages / TensorImages through the one labelled-data check; returns the class names as a list."""
    if not isinstance(source, (FolderImages, TensorImages)):
        raise IGDSInputError(f"{what} data must be a FolderImages or TensorImages, got {type(source).__name__}")
    images, labels = (source, None) if isinstance(source, FolderImages) else (source.images, source.labels)
    _, class_names = check_labelled_images(
        images, labels, class_names, what=what, channels=in_channels, channels_expected_by="the config (in_channels)",
        require_every_class=require_every_class, accept_folder=True,
    )
    return class_names


def train_ve_from_source(
    train,
    class_names: Sequence[str],
    config: VETrainConfig | None = None,
    val=None,
    log: Callable[[str], None] = print,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[VariationalEstimator, dict]:
    """`train_ve` on data sources: `igds_fast.data.FolderImages` (an ImageFolder, held or streamed;
    its class order must be `class_names`) or `TensorImages`. Same results, report and checkpoints."""
    started = time.perf_counter()
    config = config if config is not None else VETrainConfig()
    if not isinstance(config, VETrainConfig):
        raise IGDSInputError(f"config must be a VETrainConfig, got {type(config).__name__}")
    # Training needs every class (each one's centroid Q_y and classifier row come from its images);
    # held-out data is only evaluated.
    class_names = _check_source(train, class_names, config.in_channels, "training", require_every_class=True)
    if val is not None:
        _check_source(val, class_names, config.in_channels, "validation", require_every_class=False)
    if len(train) < 2:
        raise IGDSInputError(f"need at least 2 training images, got {len(train)}")
    device = resolve_device(config.device)
    scheme, _ = parse_init(config.init)
    if config.mean is not None:
        mean, std = config.mean, config.std
    elif scheme == "moco":
        mean, std = IMAGENET_MEAN, IMAGENET_STD  # what MoCo's ImageNet training normalised with
    elif isinstance(train, FolderImages):
        mean, std = train.image_statistics()  # exact, from the integer pixel sums of its scan
    else:
        mean, std = image_statistics(train.images)
    preprocess = EncoderPreprocess(config.resolution, mean, std).to(device)
    encoder = _build_encoder(config)  # a bad MoCo checkpoint fails here, before training
    checkpoint = None if checkpoint is None else os.fspath(checkpoint)
    if checkpoint is not None and not os.path.isdir(os.path.dirname(os.path.abspath(checkpoint))):
        raise IGDSInputError(f"checkpoint folder {os.path.dirname(os.path.abspath(checkpoint))!r} does not exist")

    batch_size = min(config.batch_size, len(train))
    with torch_threads(cpu_threads(device, config.num_threads, batch_size * config.resolution ** 2 * 64)) as threads:
        ve, report = _train_stages(train, val, class_names, config, encoder, preprocess, mean, std, device, log,
                                   checkpoint=checkpoint, progress=progress)
    report["threads"] = threads if device.type == "cpu" else None
    report["seconds"]["total"] = round(time.perf_counter() - started, 3)
    entropy = report["label_entropy"]
    for split in ("train", "val"):
        if split in report:
            r = report[split]
            log(f"train-ve: {split}: accuracy {r['accuracy']:.2f}%  I(X;Y) ~ H(Y) - CE = {entropy:.4f} - "
                f"{r['cross_entropy']:.4f} = {r['prototype_information']:.4f} nats  "
                f"H(X|Y) ~ E KL(P||Q_y) = {r['contextual_information']:.4f} nats")
    log(f"train-ve: done in {report['seconds']['total']:.1f}s")
    return ve, report


__all__ = [
    "VETrainConfig",
    "cmi_term",
    "extract_features",
    "fit_linear_classifier",
    "info_nce_loss",
    "label_entropy",
    "parse_init",
    "prototype_information",
    "random_view",
    "train_ve",
    "train_ve_from_source",
    "update_log_centroids",
]
