"""resolve_device: None means CUDA when available; a bad or absent device is a one-line IGDSInputError."""
from __future__ import annotations

import pytest
import torch

import igds_fast.devices as devices
from igds_fast.devices import default_device, resolve_device
from igds_fast.errors import IGDSInputError


def test_none_is_cuda_exactly_when_cuda_is_available(monkeypatch):
    for available, expected in ((True, torch.device("cuda")), (False, torch.device("cpu"))):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        assert default_device() == expected
        assert resolve_device(None) == expected


def test_a_named_device_is_parsed():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu", 0)) == torch.device("cpu", 0)


def test_none_follows_default_device(monkeypatch):
    """Callers reach the default through resolve_device, so one patch of default_device moves them all."""
    chosen = torch.device("cpu", 3)
    monkeypatch.setattr(devices, "default_device", lambda: chosen)
    assert resolve_device(None) == chosen


@pytest.mark.parametrize("device, message", [
    ("nosuchdevice", r"unknown device 'nosuchdevice'"),
    (1.5, r"unknown device 1\.5"),
])
def test_a_bad_device_name_is_one_line(device, message):
    with pytest.raises(IGDSInputError, match=message) as info:
        resolve_device(device)
    assert "\n" not in str(info.value)


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(IGDSInputError, match="CUDA is not available on this machine") as info:
            resolve_device(name)
        assert "\n" not in str(info.value)


def test_a_cuda_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(IGDSInputError, match=r"device 'cuda:2': this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
