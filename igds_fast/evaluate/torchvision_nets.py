"""torchvision's classification networks by name (`torchvision:<name>`), as students and as teachers.

torchvision is an optional extra (``pip install "igds_fast[torchvision]"``); without it every
``torchvision:`` name is refused in one line that says how to install it, and nothing else needs it.

* Students: ``torchvision.models.get_model(name, weights=None, num_classes=C)``: any name of
  ``torchvision.models.list_models(module=torchvision.models)`` (the classification models:
  ``resnet18``, ``resnet50``, ``resnet101``, ``mobilenet_v2``, ``efficientnet_b0``, ``swin_t``, ...),
  initialised as torchvision initialises them, never with downloaded weights (RDED's and SRe2L's
  students: ``thmodels.__dict__[name](pretrained=False)``, RDED ``synthesize/utils.py:206``, SRe2L
  ``validate/train_FKD.py:147``).
* Teachers: the same constructor with the class count read from a local file
  (:mod:`igds_fast.evaluate.teachers`); nothing is downloaded.
"""
from __future__ import annotations

from typing import Any

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


def has_batch_norm(model: nn.Module) -> bool:
    """Whether the model keeps BatchNorm running statistics (what a no-grad train-mode forward changes)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


__all__ = ["INSTALL_HINT", "PREFIX", "build_torchvision_network", "has_batch_norm", "is_torchvision_name", "model_name"]
