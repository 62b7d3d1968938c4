"""The one default-device rule: CUDA when it is available, else the CPU; bad device strings in one line."""
from __future__ import annotations

import torch

from .errors import IGDSInputError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device (None: cuda if available, else cpu).

    A string torch cannot parse ("nosuchdevice") or a CUDA device on a machine without one is a
    one-line IGDSInputError naming it, before any model is built.
    """
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise IGDSInputError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise IGDSInputError(f"--device {device}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise IGDSInputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


__all__ = ["resolve_device"]
