"""What a device computes per second, for the cost printed before a run (distill --plan, calibrate-beta, eval).

`device_peak`: a known GPU's dense peak in the run's compute dtype (NVIDIA's datasheets, no sparsity),
or, on a CPU, a matmul timed here in that dtype. A FLOP-based time is the counted FLOPs at EFFICIENCY
of that peak, and is always labelled an estimate: real kernels reach more or less of it (the project's
ADM-256 target, 1.05 s per 250-step image on an H100, is 54% of the bf16 peak; small networks and
eager float32 convolutions reach far less).
"""
from __future__ import annotations

import math
import time

import torch

EFFICIENCY = 0.5  # the fraction of the device's peak a FLOP-based estimate assumes
DEVICE_PEAKS = (  # (substrings of torch.cuda.get_device_name, dense FLOP/s by dtype); the first match wins
    (("H200",), {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12}),
    (("H100", "PCIe"), {"bf16": 756.5e12, "fp16": 756.5e12, "fp32": 51.2e12}),
    (("H100",), {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12}),
    (("A100",), {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
)
CPU_MATMUL_SIDE = 384  # the timed CPU matmul: 2 x 384^3 = 0.11 GFLOP, a few ms


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the device type ("cpu")."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def device_peak(device: torch.device, dtype: str = "fp32") -> tuple[float | None, str]:
    """(peak FLOP/s in `dtype` ("fp32", "bf16", "fp16"), where it comes from); (None, why) when unknown."""
    device = torch.device(device)
    name = device_name(device)
    if device.type == "cuda":
        for parts, peaks in DEVICE_PEAKS:
            if all(part in name for part in parts):
                return peaks[dtype], f"{peaks[dtype] / 1e12:.0f} TFLOP/s, {name}'s dense {dtype} peak (datasheet)"
        return None, f"no peak known for {name}"
    if device.type == "cpu":
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        side = CPU_MATMUL_SIDE
        a, b = torch.randn(side, side).to(torch_dtype), torch.randn(side, side).to(torch_dtype)
        best = math.inf
        for _ in range(4):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
        rate = 2 * side ** 3 / best
        return rate, f"{rate / 1e9:.1f} GFLOP/s, a {dtype} {side}^3 matmul timed on {torch.get_num_threads()} thread(s)"
    return None, f"no peak known for {device.type}"


def flop_time(flops: float, device, dtype: str = "fp32") -> tuple[float | None, str]:
    """(seconds, label) of `flops` at EFFICIENCY of the device's peak; (None, why) without a peak."""
    peak, where = device_peak(device, dtype)
    if peak is None:
        return None, where
    return flops / (peak * EFFICIENCY), f"estimate: the counted FLOPs at {EFFICIENCY:.0%} of {where}"


def format_flops(value: float) -> str:
    """FLOPs with an SI prefix: '22.56 EFLOP'."""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}FLOP"
    return f"{value:.0f} FLOP"


def format_hours(seconds: float) -> str:
    """A long duration: '12.3 s', '4.5 min', '7.8 h', '12.5 days'."""
    if seconds >= 48 * 3600:
        return f"{seconds / 86400:,.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


__all__ = ["CPU_MATMUL_SIDE", "DEVICE_PEAKS", "EFFICIENCY", "device_name", "device_peak", "flop_time", "format_flops",
           "format_hours"]
