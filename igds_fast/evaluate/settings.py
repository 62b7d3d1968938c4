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
from igds_fast.evaluate.soft_protocols import SOFT_PROTOCOLS, KDProtocol, kd_protocol
from igds_fast.evaluate.teachers import TEACHER_ARCH_HELP, check_teacher_arch
from igds_fast.settings import option, require_paths, section

ALL_PROTOCOLS = PROTOCOLS + SOFT_PROTOCOLS
BASELINES = ("random-real",)
MINIMAX_SIZE = 224  # MinimaxDiffusion argument.py:93: --size 224, applied to training and test images (data.py:303-304)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How the networks are trained: the network, the protocol and the settings that override it (None:
    the protocol's); validated on construction (one-line IGDSInputError)."""

    network: str = option("convnet6", "--network", help="convnet3..convnet6, resnet_ap10, resnet18_in, or "
                          "torchvision:<name> (any torchvision classification model, e.g. torchvision:resnet18; "
                          "needs the torchvision extra)")
    protocol: str = option("igds", "--protocol", choices=ALL_PROTOCOLS, help="evaluation recipe: igds (the paper's "
                           "Appendix F), minimax (MinimaxDiffusion's train.py), rded (RDED's online KD from a "
                           "teacher) or sre2l (SRe2L's FKD relabel, then replay); the last three RGB only")
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
    teacher: str | None = option(None, "--teacher", metavar="CKPT", help="rded / sre2l: the teacher's weights, a "
                                 "local state-dict file in its architecture's layout (read with weights_only=True; never "
                                 "downloaded); 1000 outputs map ImageNet subsets by wnid")
    teacher_arch: str | None = option(None, "--teacher-arch", metavar="ARCH",
                                      default_text="torchvision:resnet18, as RDED's and SRe2L's scripts",
                                      help=f"the teacher's architecture: {TEACHER_ARCH_HELP}")
    temperature: float | None = option(None, "--temperature", parse=float, default_text="20, as both peers' "
                                       "ImageNet scripts", help="rded / sre2l: the KD temperature T")
    rded_factor: int | None = option(None, "--rded-factor", parse=int, default_text="2, as RDED's scripts",
                                     help="rded: ShufflePatches strips per axis; the crop scale is (1/factor, 1)")
    soft_label_topk: int = option(0, "--soft-label-topk", parse=int, default_text="0: every class, fp16 logits "
                                  "as SRe2L", help="sre2l: store the top-K logits per crop (SRe2L's keep_top_k at T)")
    ignore_class_check: bool = option(False, "--ignore-class-check", action="store_true",
                                      help="rded / sre2l: train even when the teacher's top-1 on real validation "
                                      "images is not clearly above chance (a class-order mismatch)")
    also_hard_labels: bool = option(False, "--also-hard-labels", action="store_true",
                                    help="rded / sre2l: also train the same set with hard labels under the same "
                                    "recipe (how much of the number the teacher carries)")

    def __post_init__(self):
        if not isinstance(self.network, str) or not self.network:
            raise IGDSInputError(f"--network must be a network name, got {self.network!r}")
        if self.protocol not in ALL_PROTOCOLS:
            raise IGDSInputError(f"unknown evaluation protocol {self.protocol!r}; choose from {', '.join(ALL_PROTOCOLS)}")
        self._check_soft_settings()
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

    @property
    def soft(self) -> bool:
        return self.protocol in SOFT_PROTOCOLS

    def _check_soft_settings(self) -> None:
        """The soft-label flags apply to rded / sre2l only; the hard-label recipe's overrides to igds / minimax only."""
        soft_only = [("--teacher", self.teacher is not None), ("--teacher-arch", self.teacher_arch is not None),
                     ("--temperature", self.temperature is not None), ("--ignore-class-check", self.ignore_class_check),
                     ("--also-hard-labels", self.also_hard_labels)]
        if not self.soft:
            given = [flag for flag, on in soft_only if on]
            if given:
                raise IGDSInputError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --protocol rded "
                                     "or sre2l only")
        else:
            given = [flag for flag, on in (("--schedule", self.schedule is not None),
                                           ("--weight-decay", self.weight_decay is not None),
                                           ("--cutmix-prob", self.cutmix_prob is not None),
                                           ("--no-flip", not self.horizontal_flip)) if on]
            if given:
                raise IGDSInputError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --protocol igds "
                                     f"or minimax only (--protocol {self.protocol} is its peer's recipe)")
            if self.teacher is None:
                raise IGDSInputError(f"--protocol {self.protocol} needs --teacher CKPT (a local weights file; "
                                     "--teacher-arch names its architecture)")
            if self.teacher_arch is not None:
                check_teacher_arch(self.teacher_arch)
            if self.temperature is not None and not (_is_real(self.temperature) and self.temperature > 0):
                raise IGDSInputError(f"--temperature must be > 0, got {self.temperature!r}")
        if self.rded_factor is not None and self.protocol != "rded":
            raise IGDSInputError("--rded-factor applies to --protocol rded only")
        if self.rded_factor is not None and (not _is_int(self.rded_factor) or not 1 <= self.rded_factor <= 8):
            raise IGDSInputError(f"--rded-factor must be in 1..8, got {self.rded_factor!r}")
        if self.soft_label_topk and self.protocol != "sre2l":
            raise IGDSInputError("--soft-label-topk applies to --protocol sre2l only")
        if not _is_int(self.soft_label_topk) or self.soft_label_topk < 0:
            raise IGDSInputError(f"--soft-label-topk must be >= 0, got {self.soft_label_topk!r}")

    def kd_protocol(self, ipc: int, num_classes: int, image_size: int | None) -> KDProtocol:
        """The rded / sre2l preset for this problem with the given overrides (epochs, lr, batch, T, size, factor)."""
        return kd_protocol(self.protocol, self.network, ipc, num_classes, image_size=image_size,
                           teacher_arch=self.teacher_arch,
                           batch_size=self.batch_size, epochs=self.epochs, lr=self.lr, temperature=self.temperature,
                           patch_factor=self.rded_factor)

    def keywords(self, num_classes: int, channels: int) -> dict:
        """`evaluate_distilled`'s keyword arguments for `num_classes` classes of `channels`-channel images.

        Every setting under its own name, but: `protocol` is the preset resolved for the problem
        (`protocol_for`, which refuses minimax on grey images), and the flip / CutMix settings become
        `augment`, the protocol's AugmentConfig with what they change (None when neither is given: the
        protocol's augmentations, not an override)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _SOFT_FIELDS}
        protocol = protocol_for(values.pop("protocol"), num_classes, channels)
        changes = {} if values.pop("horizontal_flip") else {"horizontal_flip": False}
        cutmix_prob = values.pop("cutmix_prob")
        if cutmix_prob is not None:
            changes["cutmix_prob"] = cutmix_prob
        augment = dataclasses.replace(protocol.augment, **changes) if changes else None
        return {**values, "protocol": protocol, "augment": augment}


_SOFT_FIELDS = ("teacher", "teacher_arch", "temperature", "rded_factor", "soft_label_topk", "ignore_class_check",
                "also_hard_labels")


@dataclass(frozen=True, kw_only=True)
class EvalRun:
    """`igds-fast eval`: the distilled and the real folders, how they are loaded, where the results go;
    `training`: the EvalSettings."""

    train: str = option(flag="--train", metavar="DISTILLED_DIR", help="distilled set: DIR/<class>/<images>")
    val: str = option(flag="--val", metavar="REAL_VAL_DIR", help="real validation set: DIR/<class>/<images>")
    image_size: int | None = option(None, "--image-size", parse=int, help="side the networks see: both sets are "
                                    "resized/cropped to it (rded / sre2l: the crops' output and the test crop)",
                                    default_text="igds: the first distilled image's shorter side; minimax 224 (its "
                                    "--size); rded 224 (128 for conv5/6 on 10 or 100 classes); sre2l 224")
    ipc: int | None = option(None, "--ipc", parse=int, help="images per class to evaluate: a class folder holding more "
                             "is cut to its first IPC files by name (MinimaxDiffusion's _subset rule)",
                             default_text="every file")
    channels: int = option(3, "--channels", parse=int, choices=(1, 3), help="1 = grayscale, 3 = RGB")
    on_corrupt: str = option("skip", "--on-corrupt", choices=ON_CORRUPT,
                             help="unreadable images: skip and count them, or stop")
    out: str | None = option(None, "--out", metavar="RESULTS_JSON", help="write the results here (atomically)")
    progress: bool = option(True, "--quiet", action="store_false", help="no per-seed progress on stderr")
    baseline: str | None = option(None, "--baseline", choices=BASELINES, help="also evaluate a random subset of "
                                  "--real with the same IPC (fixed seed) under the same protocol, teacher and seeds")
    real: str | None = option(None, "--real", metavar="REAL_TRAIN_DIR", help="--baseline random-real: the real "
                              "training set DIR/<class>/<images> it draws from")
    relabel_dir: str | None = option(None, "--relabel-dir", metavar="DIR", help="sre2l: where the relabel stage "
                                     "writes its soft labels (resumable; e.g. beside the distilled folder)")
    training: EvalSettings = section(EvalSettings, "training recipe")

    def __post_init__(self):
        require_paths(("--train", self.train), ("--val", self.val))
        check_folder_settings(self.image_size, self.on_corrupt, self.channels)
        if self.ipc is not None and (not _is_int(self.ipc) or self.ipc < 1):
            raise IGDSInputError(f"--ipc must be >= 1, got {self.ipc!r}")
        if (self.baseline is None) != (self.real is None):
            raise IGDSInputError("--baseline random-real and --real DIR go together" if self.baseline is None
                                 else "--baseline random-real needs --real REAL_TRAIN_DIR")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise IGDSInputError(f"unknown baseline {self.baseline!r}; choose from {', '.join(BASELINES)}")
        if self.relabel_dir is not None and self.training.protocol != "sre2l":
            raise IGDSInputError("--relabel-dir applies to --protocol sre2l only")
        if self.training.protocol == "sre2l" and self.relabel_dir is None:
            raise IGDSInputError("--protocol sre2l needs --relabel-dir DIR for its soft labels (e.g. DISTILLED_DIR.relabel, "
                                 "beside the distilled folder)")
        if self.training.soft and self.channels != 3:
            raise IGDSInputError(f"--protocol {self.training.protocol} is an RGB ImageNet recipe; --channels is {self.channels}")

    def load_size(self, first_class: str) -> int:
        """The side both sets are loaded at: --image-size, else the protocol's (minimax 224, as its
        train.py's --size), else the shorter side of the first image of the distilled class folder
        `first_class` (its header only; nothing decoded)."""
        if self.image_size is not None:
            return self.image_size
        if self.training.protocol == "minimax":
            return MINIMAX_SIZE
        return self.stored_size(first_class)

    def stored_size(self, first_class: str) -> int:
        """The shorter side of the first image of the distilled class folder `first_class` (its header only)."""
        folder = os.path.join(self.train, first_class)
        path = os.path.join(folder, sorted(name for name in os.listdir(folder) if is_image_file(name))[0])
        try:
            with Image.open(path) as image:
                return min(image.size)
        except OSError as exc:
            raise IGDSInputError(f"cannot read image size of {path!r}: {exc}") from None


__all__ = ["ALL_PROTOCOLS", "BASELINES", "EvalRun", "EvalSettings", "MINIMAX_SIZE"]
