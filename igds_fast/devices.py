"""Which torch device a run uses: one rule for every `device=None`, one check for a named device.

None means CUDA when this machine has it, else the CPU. A named device is parsed and checked here,
before any work starts, so that a typo or a CUDA device on a machine without one is a one-line
IGDSInputError instead of a torch error deep inside training.
"""
from __future__ import annotations

import torch

from .errors import IGDSInputError


def default_device() -> torch.device:
    """CUDA when available, else the CPU (what `device=None` means everywhere)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device (None -> :func:`default_device`); one-line IGDSInputError when it
    is not a device name or names a CUDA device this machine does not have."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise IGDSInputError(f"unknown device {device!r}; use e.g. 'cpu', 'cuda' or 'cuda:0'") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise IGDSInputError(f"device {str(device)!r}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise IGDSInputError(f"device {str(device)!r}: this machine has {count} CUDA device(s)")
    return resolved
