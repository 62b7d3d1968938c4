"""What the compiled backend says about a compile: one line before it, progress while it runs, its time after.

A first compile of a large UNet takes minutes. With nothing on the screen a user cannot tell a compile
from a hang, so before the first step of a batch shape runs newly compiled copies, CompiledStep logs
(its `log`, by default one line on stderr; `CompileConfig.compile_progress=False` / `--no-compile-progress`
turns it off):

    compiled backend: compiling the UNet (ADMUNet, 553.8M parameters, bf16) and the encoder forward +
    input-gradient backward (ResNet, 23.5M parameters, bf16) for batch 32 (chosen from free device
    memory) with torch.compile inductor, mode 'default': roughly 1m10s the first time (a rough
    estimate, 35s to 2m21s); a repeat with the same model, batch and mode reuses inductor's cache
    (/tmp/torchinductor_me) and takes far less; --compile-mode max-autotune-no-cudagraphs compiles
    far longer for faster steps

(one line), then, every `heartbeat_s` while it compiles, "compiled backend: still compiling, 30s so
far (roughly 1m10s expected)", and after each warm-up step and the capture its measured time.

The estimate is seconds per module of the compiled copies (leaf modules; the encoder and decoder
counted twice, forward and input-gradient backward), per backend, device and mode (SECONDS_PER_MODULE,
with where each number comes from). It is a rough guide, not a measurement; the measured time follows.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

import torch.nn as nn

from ...progress import format_duration

PREFIX = "compiled backend:"
HEARTBEAT_S = 30.0

# Seconds of compile per leaf module of the compiled copies (the encoder's and decoder's counted twice).
SECONDS_PER_MODULE = {
    # PyTorch's published first-call compile of Flux-1-Dev's transformer, mode "default", on an H100: 67 s
    # for roughly 780 leaf modules (pytorch.org devlog "torch.compile and Diffusers", 2026-05-11).
    ("inductor", "cuda", "default"): 0.09,
    # max-autotune benchmarks kernel choices at compile time: 25 s -> 360 s on one timm model
    # (pytorch/torchdynamo#1807), and coordinate-descent tuning alone has doubled a model's compile
    # (pytorch/pytorch#136867). Taken as 8x "default" until a GPU run here measures it.
    ("inductor", "cuda", "max-autotune-no-cudagraphs"): 0.7,
    # Measured here: the tiny bench preset (tiny ADM + ResNet-18, 236 module-passes), inductor's C++
    # backend, cold, 77 s on 2 shared CPU cores (bench/RESULTS.md, 2026-11-23).
    ("inductor", "cpu", "default"): 0.33,
    ("inductor", "cpu", "max-autotune-no-cudagraphs"): 0.33,
    # aot_eager generates no code: 4.0 s for the same tiny preset on the same CPU (bench/sampler.py).
    ("aot_eager", "cuda", "default"): 0.02,
    ("aot_eager", "cpu", "default"): 0.02,
}
DEFAULT_SECONDS_PER_MODULE = 0.33


def leaf_modules(module) -> int:
    """Leaf modules of `module` (0 for something that is not an nn.Module: nothing torch.compile'd of ours)."""
    if not isinstance(module, nn.Module):
        return 0
    return sum(1 for m in module.modules() if next(m.children(), None) is None)


def estimate_compile_seconds(modules: int, backend: str, device_type: str, mode: str) -> float:
    """A rough first-compile time for `modules` leaf-module passes (SECONDS_PER_MODULE)."""
    key = (backend, device_type, mode if backend == "inductor" else "default")
    return modules * SECONDS_PER_MODULE.get(key, DEFAULT_SECONDS_PER_MODULE)


def inductor_cache_dir() -> str:
    """Where inductor caches compiled code: $TORCHINDUCTOR_CACHE_DIR, else its default (/tmp/torchinductor_$USER)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.path.abspath(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # creates nothing
    except ImportError:  # another torch layout: the documented default
        import getpass
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return default_cache_dir()


def describe_model(module) -> str:
    """`ADMUNet, 553.8M parameters` for a module (its wrapped model's class when it wraps one)."""
    for name in ("unet", "encoder"):  # LowPrecisionUNet / LowPrecisionFeatures wrap the model they run
        if isinstance(getattr(module, name, None), nn.Module):
            module = getattr(module, name)
            break
    if not isinstance(module, nn.Module):
        return getattr(module, "__qualname__", type(module).__name__)
    return f"{type(module).__name__}, {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters"


def compile_line(parts: list[str], batch: int, batch_note: str, backend: str, mode: str, estimate_s: float,
                 device_type: str) -> str:
    """The line logged before a compile: what, at which batch, how, and roughly how long."""
    what = " and ".join(parts)
    how = f"torch.compile {backend}" + (f", mode {mode!r}" if backend == "inductor" else "")
    line = (f"{PREFIX} compiling {what} for batch {batch}{batch_note} with {how}: roughly "
            f"{format_duration(estimate_s)} the first time (a rough estimate, {format_duration(estimate_s / 2)} "
            f"to {format_duration(estimate_s * 2)})")
    if backend == "inductor":
        line += (f"; a repeat with the same model, batch and mode reuses inductor's cache ({inductor_cache_dir()}) "
                 "and takes far less")
        if device_type == "cuda" and mode == "default":
            line += "; --compile-mode max-autotune-no-cudagraphs compiles far longer for faster steps"
    return line


class CompileProgress:
    """While a compile runs: a heartbeat line every `heartbeat_s` (a daemon thread), then timed phases.

        with CompileProgress(log, estimate_s) as progress:
            first_warm_up_step()
            progress.done("warm-up step 1 of 2 (the compile)")
    """

    def __init__(self, log: Callable[[str], None], estimate_s: float, heartbeat_s: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.perf_counter):
        self.log, self.estimate_s, self.heartbeat_s, self.clock = log, estimate_s, heartbeat_s, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = self._phase_start = clock()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.log(f"{PREFIX} still compiling, {format_duration(self.clock() - self.started)} so far "
                     f"(roughly {format_duration(self.estimate_s)} expected)")

    def __enter__(self) -> "CompileProgress":
        self._thread = threading.Thread(target=self._beat, name="igds-compile-heartbeat", daemon=True)
        self._thread.start()
        return self

    def done(self, phase: str) -> float:
        """Log `phase` with its seconds since the previous phase (the heartbeat stops after the first)."""
        now = self.clock()
        seconds, self._phase_start = now - self._phase_start, now
        self._stop.set()
        self.log(f"{PREFIX} {phase}: {seconds:.1f}s")
        return seconds

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


__all__ = ["CompileProgress", "HEARTBEAT_S", "SECONDS_PER_MODULE", "compile_line", "describe_model",
           "estimate_compile_seconds", "inductor_cache_dir", "leaf_modules"]
