"""Every knob of VE training (`VETrainConfig`, validated on construction), the choice tuples, `parse_init`."""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

from ..errors import IGDSInputError
from ..models.resnet import ARCHS, NORMS

CENTROID_UPDATES = ("ema", "epoch")
OPTIMIZERS = ("sgd", "adam")
CLASSIFIER_OPTIMIZERS = ("lbfgs", "adam")
INIT_SCHEMES = ("none", "moco")
# Largest resolution at which a ResNet's last stage is 1x1 (stem /4, then /2 three times,
# ceil-rounded): instance norm of a 1x1 map is a constant, so such a trunk outputs constants.
_LAST_STAGE_1X1_MAX_RESOLUTION = 32


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
