"""The soft-label evaluation protocols: RDED's online KD and SRe2L's FKD relabel, as their public code runs them.

Every fact below is read from the peers' code (file:line at the commits fetched for this module:
LINs-lab/RDED 3f6453d, VILA-Lab/SRe2L 8d00cba); tests/test_eval_soft_settings.py checks this module's
settings against a table written from that code.

``rded`` -- RDED's ``validation/main.py`` with ``argument.py`` and ``scripts/imagenet-*.sh``:

* teacher frozen, eval mode (main.py:66-74), on the same normalised batch as the student
  (ImageNet mean / std, main.py:111-113); online KD on every batch: soft labels
  ``softmax(teacher(mixed) / T)``, loss ``KLDivLoss(reduction="batchmean")(log_softmax(student(mixed)
  / T), soft)`` with no T^2 factor (main.py:202-226); T = 20 with CutMix, 4 with Mixup
  (argument.py:270-274); CutMix is the default mix (argument.py:67-73), alpha 1.0 (argument.py:130-135).
* before the KD step, the student also runs on the same (already mixed: ``cutmix`` writes into the
  batch, utils.py:143) batch under ``no_grad`` in train mode (main.py:211-213): for a network with
  BatchNorm that is a second update of its running statistics per step, reproduced here.
* AdamW, betas (0.9, 0.999), weight decay 0.01 on the >1-D ``weight`` tensors only
  (main.py:86-92, utils.py:67-84, argument.py:152-154); lr by student (argument.py:276-306):
  resnet18 / 50 / 101 and conv3-6 1e-3, mobilenet_v2 2.5e-3, efficientnet_b0 2e-3, vgg11 5e-4,
  alexnet / vit_b_16 / swin_v2_t 1e-4. A student it names no rate for gets ours, labelled
  (``lr_source``): 1e-4 for vision transformers (vit / swin / maxvit), else 1e-3.
* schedule per epoch ``0.5 * (1 + cos(pi * e / E / 2))`` (main.py:95-102; ``--cos`` defaults True,
  argument.py:136): a quarter cosine, from 1 down to 0.5 at the end, not to 0.
* 300 epochs (``--re-epochs 300`` in every scripts/imagenet-*.sh; argument.py:114).
* batch by IPC: 1 -> 10, 10 -> 50, 50 -> 100, times 2 for 100 or 1000 classes, capped at
  IPC x classes (argument.py:233-258); it defines no batch for other IPCs (give --batch-size).
* training input: ``ShufflePatches(factor)`` (the image cut into ``factor`` strips per axis, shuffled;
  utils.py:164-188), RandomResizedCrop(size, scale (1 / factor, 1), antialias) and a flip
  (main.py:115-126); factor 2 in every ImageNet script.
* size 224 for ImageNet subsets and ImageNet-1K, 128 for conv5 / conv6 students on 10- and 100-class
  subsets (argument.py:181-211). Test: Resize(size // 7 * 8), CenterCrop(size) (main.py:146-160)
  on the whole validation split (``val_ipc`` 50 = ImageNet's 50 per class, argument.py:207-211).
* reported: the best test accuracy over the tests after epochs with ``epoch % 10 == 9`` past 80%
  of training and the last epoch (main.py:176-192). We report the last epoch's accuracy as the
  headline (selecting on test data is not done there) and that best figure beside it, labelled.

``sre2l`` -- SRe2L's ``relabel/`` (FKD soft labels recorded once) and ``validate/train_FKD.py``:

* relabel (relabel/relabel.sh, generate_soft_label.py:174-224): teacher resnet18 in eval mode,
  batch 1024, 300 epochs, RandomResizedCrop(224, scale (0.08, 1), bilinear) + flip + ImageNet
  normalisation, CutMix (alpha 1, utils_fkd.py:203-217) per batch, the batch order from a generator
  seeded with 42; per batch it records the crop boxes, flips, the mix permutation, lambda and box, and
  the teacher's logits in fp16 (``--use-fp16``).
* training (validate/train_FKD.sh, train_FKD.py): the recorded crops / flips / mixes replayed, no
  teacher; AdamW lr 1e-3, weight decay 0.01 on >1-D weights (train_FKD.py:58-61, 157-159,
  validate/utils.py:59-73); per epoch ``0.5 * (1 + cos(pi * e / E))`` (train_FKD.py:161-163);
  T = 20 (``-T 20``); KL batchmean, no T^2 (train_FKD.py:248-252); batch 1024 in 2 accumulation
  steps of 512 (train_FKD.py:230-260; ``--gradient-accumulation-steps 2``); 300 epochs.
* test: Resize(256), CenterCrop(224) (train_FKD.py:133-141), every epoch with ``epoch % 10 == 0`` and
  the last; the best of those is what it keeps (train_FKD.py:183-194); reported as with ``rded``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from igds_fast.errors import IGDSInputError

SOFT_PROTOCOLS = ("rded", "sre2l")
KD_SCHEDULES = ("quarter_cosine", "cosine")
# RDED argument.py:276-306: student name -> AdamW learning rate.
RDED_LR_BY_STUDENT = {
    "vgg11": 0.0005, "conv3": 0.001, "conv4": 0.001, "conv5": 0.001, "conv6": 0.001, "resnet18": 0.001,
    "resnet18_modified": 0.001, "efficientnet_b0": 0.002, "mobilenet_v2": 0.0025, "alexnet": 0.0001,
    "resnet50": 0.001, "resnet101": 0.001, "resnet101_modified": 0.001, "vit_b_16": 0.0001, "swin_v2_t": 0.0001,
}
# RDED argument.py:233-250: IPC -> batch, then x2 for 100 or 1000 classes.
RDED_BATCH_BY_IPC = {50: 100, 10: 50, 1: 10}
RDED_BATCH_FACTOR_BY_CLASSES = {100: 2, 1000: 2}


@dataclass(frozen=True)
class KDProtocol:
    """A soft-label recipe (see the module docstring); every field is recorded in the results."""

    name: str
    lr: float
    lr_source: str
    batch_size: int
    epochs: int = 300
    weight_decay: float = 0.01  # AdamW, on >1-D weights only
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "quarter_cosine"
    temperature: float = 20.0
    cutmix_beta: float = 1.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    patch_factor: int = 1  # ShufflePatches strips per axis; 1 = off
    horizontal_flip: bool = True
    image_size: int = 224
    test_resize: int = 256
    accumulation_steps: int = 1
    student_no_grad_forward: bool = False  # RDED's extra train-mode forward (BatchNorm statistics)
    # The peer's test points: epochs (0-based) with epoch % test_every == test_offset, and the last;
    # with test_after_fraction, only those with epoch > epochs * test_after_fraction (RDED's rule).
    test_every: int = 10
    test_offset: int = 9
    test_after_fraction: float | None = None

    def __post_init__(self):
        if self.name not in SOFT_PROTOCOLS:
            raise IGDSInputError(f"unknown soft-label protocol {self.name!r}")
        if not (isinstance(self.lr, float) and math.isfinite(self.lr) and self.lr > 0):
            raise IGDSInputError(f"lr must be > 0, got {self.lr!r}")
        for name in ("batch_size", "epochs", "image_size", "test_resize", "accumulation_steps", "patch_factor", "test_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise IGDSInputError(f"{name} must be a positive integer, got {value!r}")
        if self.schedule not in KD_SCHEDULES:
            raise IGDSInputError(f"unknown schedule {self.schedule!r}; choose from {', '.join(KD_SCHEDULES)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise IGDSInputError(f"--temperature must be > 0, got {self.temperature!r}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise IGDSInputError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.test_resize < self.image_size:
            raise IGDSInputError(f"test_resize {self.test_resize} is below the image size {self.image_size}")
        if self.batch_size % self.accumulation_steps:
            raise IGDSInputError(f"batch {self.batch_size} is not a multiple of {self.accumulation_steps} accumulation steps")

    def lr_factor(self, epoch: int) -> float:
        """The learning-rate multiplier of epoch ``epoch`` (0-based; LambdaLR stepped once per epoch)."""
        if self.schedule == "quarter_cosine":  # RDED main.py:95-102
            return 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs / 2))
        return 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))  # SRe2L train_FKD.py:161-163

    def tests_after(self, epoch: int) -> bool:
        """Whether the peer tests after epoch ``epoch`` (0-based): RDED main.py:179-180 (so a run of at
        most 5 epochs is never tested there), SRe2L train_FKD.py:183."""
        point = epoch % self.test_every == self.test_offset or epoch == self.epochs - 1
        if self.test_after_fraction is None:
            return point
        return point and epoch > self.epochs * self.test_after_fraction

    def to_dict(self) -> dict:
        return asdict(self)


def _student_key(network: str) -> str:
    """Our network name in RDED's vocabulary: torchvision:resnet18 -> resnet18, convnet6 -> conv6."""
    name = network.strip().lower()
    if name.startswith("torchvision:"):
        return name[len("torchvision:"):]
    compact = name.replace("-", "").replace("_", "")
    if compact.startswith("convnet") and compact[7:].isdigit():
        return f"conv{compact[7:]}"
    return compact


def rded_lr(network: str) -> tuple[float, str]:
    """(AdamW lr, where it comes from) for a student under RDED's table (argument.py:276-306)."""
    key = _student_key(network)
    if key in RDED_LR_BY_STUDENT:
        return RDED_LR_BY_STUDENT[key], f"RDED argument.py:276-306 ({key})"
    if key.startswith(("vit", "swin", "maxvit")):
        return 0.0001, f"igds_fast: RDED sets no rate for {key}; its vision transformers' 1e-4"
    return 0.001, f"igds_fast: RDED sets no rate for {key}; its ResNets' and ConvNets' 1e-3"


def rded_batch_size(ipc: int, num_classes: int) -> int:
    """RDED argument.py:233-258: 10 / 50 / 100 for IPC 1 / 10 / 50, x2 for 100 or 1000 classes, <= IPC x classes."""
    if ipc not in RDED_BATCH_BY_IPC:
        raise IGDSInputError(f"RDED's code defines the batch for IPC 1, 10 and 50 only (argument.py:233-243); "
                             f"this set has IPC {ipc}: give --batch-size")
    batch = RDED_BATCH_BY_IPC[ipc] * RDED_BATCH_FACTOR_BY_CLASSES.get(num_classes, 1)
    return min(batch, ipc * num_classes)


def rded_image_size(network: str, num_classes: int, teacher_arch: str | None = None) -> int:
    """RDED argument.py:181-211: 224, but 128 when the student or the teacher is conv5 / conv6 on the 10- and
    100-class subsets (its ImageNette, ImageWoof and ImageNet-100; RDED keeps 224 on its other 10-class
    subsets, which a class count cannot tell apart: give --image-size there)."""
    names = {_student_key(network)} | ({_student_key(teacher_arch)} if teacher_arch else set())
    if names & {"conv5", "conv6"} and num_classes in (10, 100):
        return 128
    return 224


def kd_protocol(name: str, network: str, ipc: int, num_classes: int, *, image_size: int | None = None,
                batch_size: int | None = None, epochs: int | None = None, lr: float | None = None,
                temperature: float | None = None, patch_factor: int | None = None,
                teacher_arch: str | None = None) -> KDProtocol:
    """The preset ``name`` ("rded" / "sre2l") for this student, IPC and class count; the given values
    override it (None: the preset's)."""
    if name == "rded":
        factor = 2 if patch_factor is None else patch_factor
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise IGDSInputError(f"--rded-factor must be a positive integer, got {factor!r}")
        size = rded_image_size(network, num_classes, teacher_arch) if image_size is None else image_size
        preset_lr, source = rded_lr(network)
        return KDProtocol(
            name="rded", lr=float(preset_lr if lr is None else lr), lr_source=source if lr is None else "--lr",
            batch_size=rded_batch_size(ipc, num_classes) if batch_size is None else batch_size,
            epochs=300 if epochs is None else epochs, schedule="quarter_cosine",
            temperature=20.0 if temperature is None else float(temperature),
            crop_scale=(1.0 / factor, 1.0), patch_factor=factor, image_size=size, test_resize=size // 7 * 8,
            student_no_grad_forward=True, test_every=10, test_offset=9, test_after_fraction=0.8,
        )
    if name == "sre2l":
        if patch_factor is not None:
            raise IGDSInputError("--rded-factor applies to --protocol rded only")
        size = 224 if image_size is None else image_size
        batch = 1024 if batch_size is None else batch_size
        steps = 2 if batch % 2 == 0 else 1
        return KDProtocol(
            name="sre2l", lr=float(0.001 if lr is None else lr),
            lr_source="SRe2L train_FKD.py:58-59" if lr is None else "--lr",
            batch_size=batch, epochs=300 if epochs is None else epochs, schedule="cosine",
            temperature=20.0 if temperature is None else float(temperature),
            crop_scale=(0.08, 1.0), patch_factor=1, image_size=size,
            # train_FKD.py:133-141 tests at Resize(256) + CenterCrop(224); other sizes keep that ratio.
            test_resize=256 if size == 224 else size // 7 * 8,
            accumulation_steps=steps, student_no_grad_forward=False, test_every=10, test_offset=0,
        )
    raise IGDSInputError(f"unknown soft-label protocol {name!r}; choose from {', '.join(SOFT_PROTOCOLS)}")


__all__ = ["KDProtocol", "KD_SCHEDULES", "RDED_LR_BY_STUDENT", "SOFT_PROTOCOLS", "kd_protocol", "rded_batch_size",
           "rded_image_size", "rded_lr"]
