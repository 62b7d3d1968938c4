"""Timing our reverse steps: device synchronisation, the measured matmul peak, timed step loops, fidelity.

A timed loop steps a real batch of the sampler (`Sampler.batch`: Sampler.sample's own loop, one
reverse step per call), so what is timed is what a run runs. See bench/sampler.py's docstring for
how rows are timed.
"""
from __future__ import annotations

import contextlib
import time

import torch

from bench.models import VE_CLASSES
from igds_fast.profiling import nvtx_range
from igds_fast.sampling import Sampler, fp32_reference_math
from igds_fast.seeding import INITIAL_NOISE_STREAM

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")


def synchronize():
    if GPU:
        torch.cuda.synchronize()


def matmul_peak_tflops(dtype=torch.bfloat16) -> tuple[float, int]:
    """Measured dense matmul throughput (TFLOP/s) and the size n of the n^3 product used."""
    n = 8192 if GPU else 1024
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize()
    repeats = 20 if GPU else 3
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return 2 * n**3 / seconds / 1e12, n


def timed_loop(advance, num_steps: int, warmup: int, steps: int, repeats: int, label: str, profile: bool) -> dict:
    """Time a loop of reverse steps; `advance()` runs the next one (x_{i-1} from x_i).

    `warmup` steps first, each timed on its own (the first carries torch.compile, autotuning or graph
    capture: its time above one steady step is the row's "1st-step overhead"), then `repeats` blocks of
    `steps` steps, each timed between device synchronisations; step_s = the fastest block's mean (a
    block slowed by another process on the machine does not count). Memory: peak allocated above the
    allocation at the start (weights excluded)."""
    if warmup + steps * repeats >= num_steps:
        raise SystemExit(f"--warmup + --steps x --repeats must be < the schedule's {num_steps} steps")
    synchronize()
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if GPU else 0
    warmup_times, blocks = [], []
    with nvtx_range(f"bench/{label}/warmup"):
        for _ in range(warmup):
            start = time.perf_counter()
            advance()
            synchronize()
            warmup_times.append(time.perf_counter() - start)
    for block in range(repeats):
        if profile and block == 0:
            torch.cuda.profiler.start()  # nsys --capture-range=cudaProfilerApi records from here
        start = time.perf_counter()
        with nvtx_range(f"bench/{label}/timed"):
            for _ in range(steps):
                advance()
            synchronize()
        blocks.append((time.perf_counter() - start) / steps)
        if profile and block == 0:
            torch.cuda.profiler.stop()
    peak = (torch.cuda.max_memory_allocated() - base) if GPU else None
    step_s = min(blocks)
    first = warmup_times[0] if warmup_times else None
    return {"step_s": step_s, "warmup_s": sum(warmup_times), "first_step_s": first,
            "overhead_s": None if first is None else max(0.0, first - step_s), "block_step_s": blocks,
            "work_bytes": peak}


def batch_jobs(batch: int) -> tuple[torch.Tensor, list[int]]:
    """The (VE class, seed) jobs every row of a batch size samples: classes 0..9 in turn, seeds 1000+."""
    return (torch.arange(batch, device=DEVICE) % VE_CLASSES).long(), list(range(1000, 1000 + batch))


@contextlib.contextmanager
def our_loop(sampler: Sampler, batch: int):
    """advance() running our sampler's next reverse step on the batch's jobs from x_T: Sampler.sample's
    own loop (`Sampler.batch`: x_T, numerics and the bound batch once, then one reverse step per call)."""
    labels, seeds = batch_jobs(batch)
    with sampler.batch(labels, seeds) as run:
        yield run.step


def time_steps(sampler: Sampler, batch: int, warmup: int, steps: int, label: str, profile: bool,
               repeats: int = 1) -> dict:
    """Run `warmup` then `repeats` x `steps` reverse steps of our sampler from x_T (timed_loop)."""
    with our_loop(sampler, batch) as advance:
        return timed_loop(advance, sampler.schedule.num_steps, warmup, steps, repeats, label, profile)


def time_decoder(sampler: Sampler, batch: int, repeats: int) -> float:
    """Seconds of one forward + input-gradient backward of the sampler's guidance decoder at `batch`."""
    decoder = sampler.stepper.ops.guidance.decoder  # fp32, the half copy, or the compiled copy
    generator = torch.Generator(device=DEVICE).manual_seed(7)
    shape = (batch, sampler.channels, sampler.image_size, sampler.image_size)
    z = torch.randn(shape, device=DEVICE, generator=generator) * 2

    def run():
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            image = decoder(leaf)
            (grad,) = torch.autograd.grad(image, leaf, grad_outputs=torch.ones_like(image))
        return grad

    with sampler.numerics(), nvtx_range(f"bench/decoder/B{batch}"):
        run()  # warm-up (a compiled decoder is compiled already: same shapes as the step)
        synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        synchronize()
    return (time.perf_counter() - start) / repeats


def fidelity(eager: Sampler, compiled: Sampler, batch: int, steps: int) -> dict:
    """Max per-step relative L2 errors (UNet output, x_{t-1}) of `compiled` vs `eager`, teacher-forced."""
    labels = (torch.arange(batch, device=DEVICE) % VE_CLASSES).long()
    seeds = list(range(2000, 2000 + batch))
    shape = (eager.channels, eager.image_size, eager.image_size)
    x = eager.noise_source(seeds, INITIAL_NOISE_STREAM, shape, DEVICE)
    worst_unet = worst_x = 0.0
    n = eager.schedule.num_steps
    for i in list(reversed(range(n)))[:: max(1, n // steps)][:steps]:
        with torch.no_grad(), fp32_reference_math(x.device):
            expected_out = eager.unet(x, eager.schedule.timestep_map[i].expand(batch), eager.prior_labels(labels))
        expected = eager.step(x, i, labels, None, None, seeds)
        actual = compiled.step(x, i, labels, None, None, seeds)
        out = compiled.stepper.last_model_output
        worst_unet = max(worst_unet, ((out - expected_out).norm() / expected_out.norm()).item())
        worst_x = max(worst_x, ((actual - expected).norm() / expected.norm()).item())
        x = expected
    return {"unet_rel": worst_unet, "x_rel": worst_x, "steps": steps}


__all__ = ["DEVICE", "GPU", "batch_jobs", "fidelity", "matmul_peak_tflops", "our_loop", "synchronize",
           "time_decoder", "time_steps", "timed_loop"]
