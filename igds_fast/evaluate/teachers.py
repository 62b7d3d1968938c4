"""The soft-label protocols' teacher: a network by name, its weights from a local file, frozen.

``--teacher-arch`` names the architecture: ``torchvision:<model>`` (RDED's and SRe2L's ResNet-18
teachers are torchvision's; needs the torchvision extra) or one of our evaluation networks
(``convnet3``..``convnet6``, ``resnet_ap10``, ``resnet18_in``; RDED's own scripts also distil with
ConvNet teachers, ``scripts/imagenet-nette_10ipc_conv5_to_conv5_cr5.sh``). The weights come only from
the file the user names, read with ``torch.load(weights_only=True)``: a state dict in the
architecture's own layout (torchvision's for ``torchvision:`` names), bare or under ``model`` (RDED's
subset teachers, ``synthesize/utils.py:240``) or ``state_dict`` (SRe2L's checkpoints), ``module.``
prefixes (DataParallel / DDP) stripped. Nothing is downloaded.

The class count is read from the file (the rows of the tensors whose first dimension is the class
count: those that change between a 1000-class and a 7-class build), the network built with it and
loaded strictly, so a file of another architecture or class count stops in one line -- naming the
file, the architecture and the first tensors that do not fit -- before any training. The teacher
is then put in eval mode with every parameter frozen (RDED validation/main.py:69-74).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from igds_fast.errors import IGDSInputError
from igds_fast.evaluate.networks import NETWORK_NAMES, build_eval_network
from igds_fast.evaluate.torchvision_nets import build_torchvision_network, is_torchvision_name

TEACHER_ARCH_HELP = "torchvision:NAME (e.g. torchvision:resnet18) or one of ours: " + ", ".join(NETWORK_NAMES)


def check_teacher_arch(arch: Any) -> None:
    """One line unless ``arch`` is ``torchvision:NAME`` or one of our network names, spelt as listed (a bare
    ``resnet18`` is ambiguous: torchvision's is ``torchvision:resnet18``, ours ``resnet18_in``)."""
    if not (is_torchvision_name(arch) or arch in NETWORK_NAMES):
        raise IGDSInputError(f"--teacher-arch must be {TEACHER_ARCH_HELP}; got {arch!r}")


def teacher_builder(arch: str, image_size: int) -> Callable[[int], nn.Module]:
    """A function of the class count that builds a freshly initialised ``arch`` (RGB, ``image_size`` px)."""
    check_teacher_arch(arch)
    if is_torchvision_name(arch):
        return lambda num_classes: build_torchvision_network(arch, num_classes)
    return lambda num_classes: build_eval_network(arch, 3, num_classes, image_size)


def class_count_keys(build: Callable[[int], nn.Module], arch: str) -> list[str]:
    """The state-dict keys whose first dimension is the class count (the classifier's weight and bias):
    those whose shape changes between a 1000-class and a 7-class build (Linear or convolutional heads alike)."""
    wide = build(1000).state_dict()
    narrow = build(7).state_dict()
    keys = [k for k in wide if k in narrow and tuple(wide[k].shape) != tuple(narrow[k].shape)]
    if not keys or any(wide[k].shape[0] != 1000 for k in keys):
        raise IGDSInputError(f"{arch}: cannot tell which tensors hold its classes")
    return keys


def _state_dict_of(obj: Any, path: str) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise IGDSInputError(f"teacher file {path!r} is not a state dict (tensors by name, bare or under "
                             "'model' / 'state_dict')")
    state = {}
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise IGDSInputError(f"teacher file {path!r}: tensor {key!r} holds NaN or Inf")
    return state


def read_teacher_file(path: str) -> dict[str, torch.Tensor]:
    """The teacher's state dict from a local file (``torch.load(weights_only=True)``), prefixes stripped."""
    if not isinstance(path, str) or not path:
        raise IGDSInputError("--teacher must be a path to a local checkpoint file")
    if not os.path.isfile(path):
        raise IGDSInputError(f"teacher file {path!r} does not exist (teachers are read from a local file, never "
                             "downloaded)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code, a truncated or foreign file
        reason = " ".join(str(exc).split())[:200]
        raise IGDSInputError(f"cannot read teacher file {path!r} as a weights-only torch checkpoint: {reason}") from None
    return _state_dict_of(obj, path)


def load_teacher_network(path: str, arch: str, image_size: int) -> tuple[nn.Module, int]:
    """(the teacher in eval mode with frozen parameters, its class count) from ``path`` for ``arch``."""
    build = teacher_builder(arch, image_size)
    state = read_teacher_file(path)
    key = class_count_keys(build, arch)[0]
    if key not in state or state[key].dim() < 1:
        sample = ", ".join(sorted(state)[:3])
        raise IGDSInputError(f"teacher file {path!r} does not fit {arch}: it has no classifier {key!r} "
                             f"(its keys begin {sample}); is it another architecture? (--teacher-arch)")
    num_classes = int(state[key].shape[0])
    if num_classes < 2:
        raise IGDSInputError(f"teacher file {path!r}: its classifier has {num_classes} output(s)")
    model = build(num_classes)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:2])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:2])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape ({', '.join(wrong[:2])})")
        raise IGDSInputError(f"teacher file {path!r} does not fit {arch} at {image_size} px: {'; '.join(parts)} "
                             "tensor(s); is it another architecture? (--teacher-arch)")
    model.load_state_dict(state, strict=True)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, num_classes


__all__ = ["TEACHER_ARCH_HELP", "check_teacher_arch", "class_count_keys", "load_teacher_network", "read_teacher_file",
           "teacher_builder"]
