"""The teacher's classes against the run's: the wnid mapping and the class-order check before training.

The most frequent failure of a soft-label evaluation is a teacher whose class order does not match
the data (RDED issue #10: 8.2% instead of 40.6% on ImageWoof; CaO2 issue #2: ~10%): every soft
label then points at another class and the run silently trains towards chance. Two checks stop it
before any training:

* :func:`teacher_class_map` -- which teacher output each of the run's classes reads. A teacher with
  exactly the run's class count was trained on these classes, in the folders' (sorted) order: the
  identity. A 1000-output teacher on a subset (ImageWoof, ImageNette, ImageNet-100, any wnid
  folders) reads output ``imagenet1k_wnids.index(wnid)`` for each class folder (torchvision's
  ImageNet order is the sorted wnids); on 1000 folders named otherwise, the identity. Any other
  class count is refused in one line.
* :func:`class_order_check` -- the teacher's top-1 on the first ``per_class`` real validation
  images of each class (by file name: a fixed sample), over the run's classes through that map. It
  passes when the accuracy is clearly above chance ``c = 1 / C``: above ``max(2 c, c + 4 sqrt(c (1 -
  c) / n))`` for n sampled images (a permuted teacher sits at chance; 4 standard deviations make a
  chance-level teacher pass with probability < 1e-4). Otherwise the run stops in one line naming
  the measured accuracy and the likely cause, unless the user overrides it. Both results are
  recorded in the results JSON.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from igds_fast.classes import imagenet_wnids
from igds_fast.errors import IGDSInputError

CHECK_PER_CLASS = 10
OVERRIDE_FLAG = "--ignore-class-check"


def teacher_class_map(class_names: Sequence[str], teacher_classes: int) -> tuple[list[int] | None, str]:
    """(teacher output per run class, or None for the identity; how it was decided)."""
    count = len(class_names)
    if teacher_classes == count:
        return None, f"the teacher's {count} outputs are the run's classes in the folders' order"
    if teacher_classes == 1000:
        wnids = imagenet_wnids()
        index = {wnid: i for i, wnid in enumerate(wnids)}
        missing = [name for name in class_names if name not in index]
        if missing:
            raise IGDSInputError(f"the teacher has ImageNet-1K's 1000 outputs but {len(missing)} class folder(s) are not "
                                 f"ImageNet wnids ({', '.join(missing[:3])}): name the folders by wnid, or use a teacher "
                                 f"trained on these {count} classes")
        return [index[name] for name in class_names], f"{count} classes mapped by wnid into the teacher's 1000 ImageNet-1K outputs"
    raise IGDSInputError(f"the teacher has {teacher_classes} classes; the data has {count}: use a teacher trained on "
                         f"these {count} classes (in the folders' sorted order) or an ImageNet-1K teacher (1000 outputs, "
                         "mapped by wnid)")


def select_classes(logits: torch.Tensor, class_map: list[int] | None) -> torch.Tensor:
    """The teacher's logits of the run's classes: [B, teacher classes] -> [B, C] (RDED's pruned classifier rows)."""
    if class_map is None:
        return logits
    return logits[:, torch.as_tensor(class_map, device=logits.device)]


def check_threshold(num_classes: int, images: int) -> float:
    """The accuracy (fraction) a teacher must exceed: max(2 c, c + 4 sqrt(c (1 - c) / n)), c = 1 / C."""
    chance = 1.0 / num_classes
    return max(2.0 * chance, chance + 4.0 * math.sqrt(chance * (1.0 - chance) / images))


def check_sample(labels: torch.Tensor, num_classes: int, per_class: int = CHECK_PER_CLASS) -> list[int]:
    """Indices of the first ``per_class`` images of each class in a class-ordered set (its labels [N])."""
    chosen, seen = [], [0] * num_classes
    for index, label in enumerate(labels.tolist()):
        if seen[label] < per_class:
            seen[label] += 1
            chosen.append(index)
    return chosen


@torch.inference_mode()
def class_order_check(teacher: nn.Module, val, class_map: list[int] | None, device, *, per_class: int = CHECK_PER_CLASS,
                      shard=None, reduce=None) -> dict:
    """Measure the teacher on the fixed sample of ``val`` (a FolderImages, class-ordered): a result dict.

    teacher: takes the val batches as they come ([-1, 1] images; its input normalisation wrapped in).
    shard(list) / reduce(tensor): this rank's share of the sample and the sum over ranks (torchrun);
    None = all here."""
    num_classes = len(val.class_names)
    sample = check_sample(val.labels, num_classes, per_class)
    mine = sample if shard is None else shard(sample)
    counts = torch.zeros(2, dtype=torch.float64)
    chunks = [mine[start:start + 256] for start in range(0, len(mine), 256)]
    teacher.eval()
    for images, labels, _ in val.batches(chunks, device):
        predicted = select_classes(teacher(images), class_map).argmax(dim=1)
        counts[0] += float((predicted == labels).sum())
        counts[1] += float(labels.numel())
    if reduce is not None:
        counts = reduce(counts)
    accuracy = float(counts[0] / counts[1])
    threshold = check_threshold(num_classes, int(counts[1]))
    return {"images": int(counts[1]), "per_class": per_class, "accuracy_percent": 100.0 * accuracy,
            "chance_percent": 100.0 / num_classes, "threshold_percent": 100.0 * threshold,
            "passed": accuracy > threshold}


def refuse_unless_passed(check: dict, override: bool) -> str | None:
    """Raise the one-line stop for a failed check (None when it passed); with the override, the warning line."""
    if check["passed"]:
        return None
    line = (f"the teacher's top-1 on {check['images']} real validation images is {check['accuracy_percent']:.1f}% "
            f"(chance {check['chance_percent']:.1f}%, needed > {check['threshold_percent']:.1f}%): its class order "
            "most likely does not match the class folders")
    if not override:
        raise IGDSInputError(f"{line}; stopped before training ({OVERRIDE_FLAG} runs anyway)")
    return f"{line}; running anyway ({OVERRIDE_FLAG})"


__all__ = ["CHECK_PER_CLASS", "OVERRIDE_FLAG", "check_sample", "check_threshold", "class_order_check",
           "refuse_unless_passed", "select_classes", "teacher_class_map"]
