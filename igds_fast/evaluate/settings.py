"""The settings tree of `igds-fast eval`: `EvalSettings` (the training recipe) inside `EvalRun` (the folders).

Their flags are declared on the fields (igds_fast/settings.py generates the parser). The recipe's
protocol-overriding settings (epochs, lr, schedule, weight decay, batch size, CutMix) default to None
= the protocol's value; `EvalSettings.keywords` turns the recipe into `evaluate_distilled`'s keyword
arguments for the problem at hand.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

from PIL import Image

from igds_fast.data import ON_CORRUPT, check_folder_settings, is_image_file
from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.protocol import PROTOCOLS, SCHEDULES, protocol_for
from igds_fast.settings import option, require_paths, section


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How the networks are trained: the network, the protocol and the settings that override it (None:
    the protocol's); validated on construction (one-line IGDSInputError)."""

    network: str = option("convnet6", "--network", help="convnet3..convnet6, resnet_ap10, resnet18_in")
    protocol: str = option("igds", "--protocol", choices=PROTOCOLS, help="evaluation recipe: igds (the paper's "
                           "Appendix F) or minimax (MinimaxDiffusion's train.py; RGB only)")
    seeds: int = option(3, "--seeds", parse=int, help="networks trained, seeds 0..N-1")
    epochs: int | None = option(None, "--epochs", parse=int, help="training epochs",
                                default_text="the protocol's by IPC: igds 1/10 -> 2000, 20/50 -> 1500, 100 -> 1000; "
                                "minimax 1 -> 3000, 10 -> 2000, 50 -> 1500, 100/200 -> 1000, 500 -> 500, more -> 300, "
                                "two thirds of that for 100 classes")
    lr: float | None = option(None, "--lr", parse=float, help="learning rate",
                              default_text="the protocol's: 0.01; minimax above 100 classes 0.1")
    schedule: str | None = option(None, "--schedule", choices=SCHEDULES, help="learning-rate schedule",
                                  default_text="the protocol's: igds constant, minimax step = x0.2 at 2/3 and 5/6 "
                                  "of the epochs")
    weight_decay: float | None = option(None, "--weight-decay", parse=float, help="weight decay",
                                        default_text="the protocol's: igds 0, minimax 5e-4, above 100 classes 1e-4")
    batch_size: int | None = option(None, "--batch-size", parse=int, help="images per step",
                                    default_text="the protocol's: igds the full set up to 256 images, else 64; "
                                    "minimax 64, 128 above 100 classes")
    width: int = option(128, "--width", parse=int, default_text="128, the protocol", help="ConvNet channels")
    horizontal_flip: bool = option(True, "--no-flip", action="store_false",
                                   help="disable horizontal flips (e.g. digits, text)")
    cutmix_prob: float | None = option(None, "--cutmix-prob", parse=float, default_text="the protocol's, 1.0",
                                       help="probability a batch is CutMixed")
    device: str | None = option(None, "--device", default_text="cuda if available, else cpu", help="torch device")

    def __post_init__(self):
        if not isinstance(self.network, str) or not self.network:
            raise IGDSInputError(f"--network must be a network name, got {self.network!r}")
        if self.protocol not in PROTOCOLS:
            raise IGDSInputError(f"unknown evaluation protocol {self.protocol!r}; choose from {', '.join(PROTOCOLS)}")
        if not _is_int(self.seeds) or self.seeds < 1:
            raise IGDSInputError(f"--seeds must be >= 1, got {self.seeds!r}")
        if self.epochs is not None and (not _is_int(self.epochs) or self.epochs < 1):
            raise IGDSInputError(f"--epochs must be >= 1, got {self.epochs!r}")
        if self.lr is not None and not (_is_real(self.lr) and self.lr > 0):
            raise IGDSInputError(f"--lr must be > 0, got {self.lr!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise IGDSInputError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.weight_decay is not None and not (_is_real(self.weight_decay) and self.weight_decay >= 0):
            raise IGDSInputError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise IGDSInputError(f"--batch-size must be >= 1, got {self.batch_size!r}")
        if not _is_int(self.width) or self.width < 1:
            raise IGDSInputError(f"--width must be a positive integer, got {self.width!r}")
        if self.cutmix_prob is not None and not (_is_real(self.cutmix_prob) and 0.0 <= self.cutmix_prob <= 1.0):
            raise IGDSInputError(f"--cutmix-prob must be in [0, 1], got {self.cutmix_prob!r}")

    def keywords(self, num_classes: int, channels: int) -> dict:
        """`evaluate_distilled`'s keyword arguments for `num_classes` classes of `channels`-channel images.

        Every setting under its own name, but: `protocol` is the preset resolved for the problem
        (`protocol_for`, which refuses minimax on grey images), and the flip / CutMix settings become
        `augment`, the protocol's AugmentConfig with what they change (None when neither is given: the
        protocol's augmentations, not an override)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        protocol = protocol_for(values.pop("protocol"), num_classes, channels)
        changes = {} if values.pop("horizontal_flip") else {"horizontal_flip": False}
        cutmix_prob = values.pop("cutmix_prob")
        if cutmix_prob is not None:
            changes["cutmix_prob"] = cutmix_prob
        augment = dataclasses.replace(protocol.augment, **changes) if changes else None
        return {**values, "protocol": protocol, "augment": augment}


@dataclass(frozen=True, kw_only=True)
class EvalRun:
    """`igds-fast eval`: the distilled and the real folders, how they are loaded, where the results go;
    `training`: the EvalSettings."""

    train: str = option(flag="--train", metavar="DISTILLED_DIR", help="distilled set: DIR/<class>/<images>")
    val: str = option(flag="--val", metavar="REAL_VAL_DIR", help="real validation set: DIR/<class>/<images>")
    image_size: int | None = option(None, "--image-size", parse=int, help="side both sets are resized/cropped to",
                                    default_text="the first distilled image's shorter side")
    channels: int = option(3, "--channels", parse=int, choices=(1, 3), help="1 = grayscale, 3 = RGB")
    on_corrupt: str = option("skip", "--on-corrupt", choices=ON_CORRUPT,
                             help="unreadable images: skip and count them, or stop")
    out: str | None = option(None, "--out", metavar="RESULTS_JSON", help="write the results here (atomically)")
    progress: bool = option(True, "--quiet", action="store_false", help="no per-seed progress on stderr")
    training: EvalSettings = section(EvalSettings, "training recipe")

    def __post_init__(self):
        require_paths(("--train", self.train), ("--val", self.val))
        check_folder_settings(self.image_size, self.on_corrupt, self.channels)

    def load_size(self, first_class: str) -> int:
        """The side both sets are loaded at: --image-size, else the shorter side of the first image of
        the distilled class folder `first_class` (its header only; nothing decoded)."""
        if self.image_size is not None:
            return self.image_size
        folder = os.path.join(self.train, first_class)
        path = os.path.join(folder, sorted(name for name in os.listdir(folder) if is_image_file(name))[0])
        try:
            with Image.open(path) as image:
                return min(image.size)
        except OSError as exc:
            raise IGDSInputError(f"cannot read image size of {path!r}: {exc}") from None


__all__ = ["EvalRun", "EvalSettings"]
