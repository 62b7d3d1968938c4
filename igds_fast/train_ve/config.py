"""Every knob of VE training (`VETrainConfig`, validated on construction), the choice tuples, `parse_init`,
and `VETrainRun`: the settings tree of `igds-fast train-ve` (its flags are declared on these fields)."""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

from ..data import ON_CORRUPT, check_folder_settings
from ..errors import IGDSInputError
from ..models.resnet import ARCHS, NORMS
from ..settings import option, require_paths, section

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


def float_list(text: str) -> tuple[float, ...]:
    """--mean 0.5,0.5,0.5 -> (0.5, 0.5, 0.5) (the flags' parse)."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def softplus_beta_or_relu(text: str) -> float | None:
    """--softplus-beta: a number; 0 = ReLU (None)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return None if value == 0 else value


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

    arch: str = option("resnet18", "--arch", choices=ARCHS, help="encoder architecture (a torchvision ResNet trunk)")
    in_channels: int = option(3, "--channels", parse=int, choices=(1, 3), help="1 = grayscale, 3 = RGB")
    softplus_beta: float | None = option(3.0, "--softplus-beta", parse=softplus_beta_or_relu,
                                         help="Softplus sharpness of the activations (0 = ReLU)")
    norm: str = option("batch", "--norm", choices=NORMS, help="the encoder's normalisation layers")
    resolution: int = option(32, "--resolution", parse=int, help="encoder input side")
    mean: tuple[float, ...] | None = option(None, "--mean", parse=float_list, default_text="auto",
                                            help="per-channel mean, [0,1] units")
    std: tuple[float, ...] | None = option(None, "--std", parse=float_list, default_text="auto",
                                           help="per-channel std, [0,1] units")
    tau: float = option(1.0, "--tau", parse=float, help="temperature of P = softmax(z/tau)")
    moco_dim: int = option(128, "--moco-dim", parse=int, group="MoCo", help="projection size")
    mlp_hidden: int | None = option(None, help="hidden size of the projection head (None = the feature size)")
    queue_size: int = option(4096, "--queue-size", parse=int, group="MoCo",
                             help="negative keys (clipped to the training-set size)")
    moco_momentum: float = option(0.999, "--moco-momentum", parse=float, group="MoCo", help="key encoder EMA")
    moco_temperature: float = option(0.2, "--moco-temperature", parse=float, group="MoCo",
                                     help="InfoNCE temperature tau_c")
    bn_splits: int = option(4, "--bn-splits", parse=int, group="MoCo", help="shuffle-BN groups (1 = off)")
    lambda_cmi: float = option(0.0, "--lambda", parse=float, group="CMI term",
                               help="weight of the CMI term (0 = plain MoCo)")
    centroid_update: str = option("ema", "--centroid-update", choices=CENTROID_UPDATES, group="CMI term",
                                  help="class centroids Q: an EMA per batch, or re-estimated every epoch")
    centroid_momentum: float = option(0.9, "--centroid-momentum", parse=float, group="CMI term",
                                      help="EMA weight of the old Q (0 = the current batch's class means)")
    epochs: int = option(20, "--epochs", parse=int, group="training",
                         help="contrastive epochs (0 = keep the initial encoder)")
    batch_size: int = option(256, "--batch-size", parse=int, group="training", help="images per step")
    optimizer: str = option("sgd", "--optimizer", choices=OPTIMIZERS, group="training",
                            help="sgd (momentum 0.9) or adam")
    lr: float = option(0.03, "--lr", parse=float, group="training", help="learning rate, cosine-decayed per step")
    weight_decay: float = option(1e-4, "--weight-decay", parse=float, group="training", help="weight decay")
    crop_scale: tuple[float, float] = option((0.3, 1.0), "--crop-scale", parse=float_list,
                                             group="views", help="random-resized-crop area fraction")
    horizontal_flip: bool = option(True, "--no-flip", action="store_false", group="views",
                                   help="no horizontal flips in the views")
    jitter: float = option(0.2, "--jitter", parse=float, group="views",
                           help="brightness/contrast/saturation strength (0 = off)")
    classifier_optimizer: str = option("lbfgs", "--classifier-optimizer", choices=CLASSIFIER_OPTIMIZERS,
                                       group="linear classifier", help="full-batch optimiser of the classifier")
    classifier_epochs: int = option(100, "--classifier-epochs", parse=int, group="linear classifier",
                                    help="full-batch iterations")
    classifier_lr: float = option(1.0, "--classifier-lr", parse=float, group="linear classifier", help="learning rate")
    classifier_weight_decay: float = option(1e-3, "--classifier-weight-decay", parse=float, group="linear classifier",
                                            help="L2 on the standardised-feature weights")
    recompute_bn_stats: bool = option(True, "--keep-bn-stats", action="store_false", group="linear classifier",
                                      help="do not recompute BN statistics on clean images")
    seed: int = option(0, "--seed", parse=int, group="training", help="initialisation, data-order and view seed")
    device: str | None = option(None, "--device", default_text="cuda if available, else cpu", group="training",
                                help="torch device")
    init: str = option("none", "--init", help="'none' or 'moco:PATH' (a MoCo v1/v2 checkpoint)")
    num_threads: int | None = option(None, help="CPU runs: torch intra-op threads (None = 1 for small work)")

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


@dataclass(frozen=True, kw_only=True)
class VETrainRun:
    """`igds-fast train-ve`: the image folders, the bundle to write, the checkpoint; `training` is the VETrainConfig."""

    data: str = option(flag="--data", metavar="DIR", help="training set: DIR/<class>/<images>")
    val: str | None = option(None, "--val", metavar="DIR", help="held-out set of the same classes (report only)")
    out: str = option(flag="--out", metavar="VE_SAFETENSORS", help="where to write the VE bundle")
    image_size: int | None = option(None, "--image-size", parse=int, default_text="--resolution",
                                    help="side images are loaded at")
    on_corrupt: str = option("skip", "--on-corrupt", choices=ON_CORRUPT,
                             help="unreadable images: skip and count them, or stop")
    checkpoint: str | None = option(None, "--checkpoint", metavar="PATH", default_text="OUT.checkpoint",
                                    help="per-epoch training state, resumed by a rerun; removed when done")
    progress: bool = option(True, "--quiet", action="store_false", help="no progress lines on stderr")
    training: VETrainConfig = section(VETrainConfig, "encoder")

    def __post_init__(self):
        require_paths(("--data", self.data), ("--out", self.out))
        check_folder_settings(self.image_size, self.on_corrupt)

    @property
    def load_size(self) -> int:
        """The side the images are loaded at: --image-size, else the encoder's --resolution."""
        return self.image_size if self.image_size is not None else self.training.resolution

    @property
    def checkpoint_path(self) -> str:
        """Where the per-epoch training state goes: --checkpoint, else OUT.checkpoint."""
        return self.checkpoint if self.checkpoint is not None else self.out + ".checkpoint"
