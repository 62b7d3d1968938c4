"""torchvision's classification networks by name (`torchvision:<name>`), as students and as teachers.

torchvision is an optional extra (``pip install "igds_fast[torchvision]"``); without it every
``torchvision:`` name is refused in one line that says how to install it, and nothing else needs it.

* Students: ``torchvision.models.get_model(name, weights=None, num_classes=C)``: any name of
  ``torchvision.models.list_models(module=torchvision.models)`` (the classification models:
  ``resnet18``, ``resnet50``, ``resnet101``, ``mobilenet_v2``, ``efficientnet_b0``, ``swin_t``, ...),
  initialised as torchvision initialises them, never with downloaded weights (RDED's and SRe2L's
  students: ``thmodels.__dict__[name](pretrained=False)``, RDED ``synthesize/utils.py:206``, SRe2L
  ``validate/train_FKD.py:147``).
* Teachers: the same constructor with the class count read from the file, then
  ``load_state_dict(strict=True)`` of a *local* file read with ``torch.load(weights_only=True)``:
  torchvision's state-dict layout, bare or under ``model`` (RDED's subset teachers,
  ``synthesize/utils.py:240``) or ``state_dict`` (SRe2L's checkpoints), ``module.`` prefixes
  (DataParallel / DDP) stripped. Nothing is downloaded. A file of another architecture, or one
  that is not a state dict, is one line naming the file, the architecture and the first keys that
  do not fit.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from igds_fast.errors import IGDSInputError

PREFIX = "torchvision:"
INSTALL_HINT = 'pip install "igds_fast[torchvision]" (a torchvision built for this torch: torch 2.14.1 + torchvision 0.29.1)'


def is_torchvision_name(name: Any) -> bool:
    return isinstance(name, str) and name.strip().lower().startswith(PREFIX)


def _torchvision_models():
    try:
        import torchvision.models as models  # noqa: PLC0415 - optional extra, imported on use only
    except Exception as exc:  # ImportError, or a torchvision built for another torch (RuntimeError / OSError)
        reason = " ".join(str(exc).split())[:160]
        raise IGDSInputError(f"torchvision networks need torchvision, which cannot be imported here ({reason}); "
                             f"install it: {INSTALL_HINT}") from None
    return models


def model_name(name: str) -> str:
    """``torchvision:resnet18`` -> ``resnet18``, checked against torchvision's classification models."""
    if not is_torchvision_name(name):
        raise IGDSInputError(f"not a torchvision network name (torchvision:<name>): {name!r}")
    short = name.strip()[len(PREFIX):].strip()
    models = _torchvision_models()
    known = models.list_models(module=models)
    if short not in known:
        raise IGDSInputError(f"{name!r} is not a torchvision classification model; choose from "
                             f"{', '.join(sorted(known)[:12])}, ... ({len(known)} names: torchvision.models.list_models())")
    return short


def build_torchvision_network(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised torchvision classifier ``name`` (``torchvision:<model>``) with ``num_classes`` outputs."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise IGDSInputError(f"num_classes must be at least 2, got {num_classes!r}")
    short = model_name(name)
    models = _torchvision_models()
    try:
        return models.get_model(short, weights=None, num_classes=num_classes)
    except (TypeError, ValueError) as exc:
        raise IGDSInputError(f"torchvision cannot build {short} with {num_classes} classes: {exc}") from None


def class_count_keys(name: str) -> list[str]:
    """The state-dict keys whose first dimension is the class count (the classifier's weight and bias):
    those whose shape changes between a 1000-class and a 7-class build (Linear or convolutional heads alike)."""
    wide = build_torchvision_network(name, 1000).state_dict()
    narrow = build_torchvision_network(name, 7).state_dict()
    keys = [k for k in wide if k in narrow and tuple(wide[k].shape) != tuple(narrow[k].shape)]
    if not keys or any(wide[k].shape[0] != 1000 for k in keys):
        raise IGDSInputError(f"{name}: cannot tell which tensors hold its classes")
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


def load_torchvision_teacher(path: str, arch: str) -> tuple[nn.Module, int]:
    """(the teacher in eval mode with frozen parameters, its class count) from ``path`` for ``arch``.

    The class count is the classifier's row count in the file; the model is built with it and loaded
    strictly, so a file of another architecture stops in one line before any training."""
    state = read_teacher_file(path)
    key = class_count_keys(arch)[0]
    if key not in state or state[key].dim() < 1:
        sample = ", ".join(sorted(state)[:3])
        raise IGDSInputError(f"teacher file {path!r} does not fit {arch}: it has no classifier {key!r} "
                             f"(its keys begin {sample}); is it another architecture? (--teacher-arch)")
    num_classes = int(state[key].shape[0])
    if num_classes < 2:
        raise IGDSInputError(f"teacher file {path!r}: its classifier has {num_classes} output(s)")
    model = build_torchvision_network(arch, num_classes)
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
        raise IGDSInputError(f"teacher file {path!r} does not fit {arch}: {'; '.join(parts)} tensor(s); is it another "
                             "architecture? (--teacher-arch)")
    model.load_state_dict(state, strict=True)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, num_classes


def has_batch_norm(model: nn.Module) -> bool:
    """Whether the model keeps BatchNorm running statistics (what a no-grad train-mode forward changes)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


__all__ = ["INSTALL_HINT", "PREFIX", "build_torchvision_network", "class_count_keys", "has_batch_norm",
           "is_torchvision_name", "load_torchvision_teacher", "model_name", "read_teacher_file"]
