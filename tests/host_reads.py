"""Recording every read of a tensor value back to the host: what would synchronise with a GPU.

The CPU stand-in for CUDA's sync-debug mode in the tests of the loops that must not synchronise.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")
# ATen ops that read a device value back to the host from C++ (no Python method call to see):
# scalar reads (a 0-d tensor used as a basic index, .item() in C++), and ops whose output size
# depends on the data.
SYNCING_ATEN_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                    "unique_consecutive", "equal", "is_nonzero", "repeat_interleave")


class SyncingOpRecorder(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_ATEN_OPS:
            self.calls.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))


def host_reads(monkeypatch):
    """Records every tensor-to-host read (what synchronises with a GPU) from now on, in a list.

    Python-level reads (Tensor.item, bool(), ...) by patching torch.Tensor. Reads made inside ATen
    (e.g. `table[i]` with a 0-d tensor i) need `with SyncingOpRecorder(calls):` around the code too.
    """
    calls = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def recording(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recording)
    return calls
