"""Benchmark every fused kernel against the eager torch sequence it replaces.

    python bench/kernels.py                     # print the markdown table
    python bench/kernels.py --append-results    # ... and append it to bench/RESULTS.md

On a GPU: the real sizes (guidance head B in {64, 256}, d = 2048, C in {1000, 10}; DDPM update and
preprocess at 3 x 256 x 256 per image, preprocess to 224), medians of `triton.testing.do_bench`, and
the device's measured device-to-device copy bandwidth as the yardstick: for each kernel the FLOP and
minimal byte counts are computed first, the byte floor (bytes / copy bandwidth) is printed, and the
fused kernel's achieved GB/s is reported against that bandwidth.

Without a GPU it runs the same cases at tiny sizes under TRITON_INTERPRET=1 so the script cannot
rot; those absolute CPU numbers mean nothing (the interpreter executes each program in numpy).
Every case also checks the fused output against the eager one before timing it.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import shlex
import statistics
import sys
import time
import traceback

import torch

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton or any kernel module is imported

import triton  # noqa: E402
import triton.testing  # noqa: E402

from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig  # noqa: E402
from igds_fast.kernels import (  # noqa: E402
    StepTables,
    fused_ddpm_update,
    guidance_head,
    philox_normal,
    predict_x0,
    preprocess_backward,
    preprocess_forward,
    seeds_to_tensor,
)
from igds_fast.guidance.objective import igds_objective_and_grad  # noqa: E402
from igds_fast.preprocess import IMAGENET_MEAN, IMAGENET_STD, EncoderPreprocess  # noqa: E402
from igds_fast.seeding import seeded_normal  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
DEVICE = "cuda" if GPU else "cpu"


def median_us(fn) -> float:
    """Median wall time of fn() in microseconds (do_bench on a GPU, a few perf_counter runs on CPU)."""
    if GPU:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e6


def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time), GB/s."""
    numel = (256 << 20) // 4 if GPU else (4 << 20) // 4
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src))
    return 2 * numel * 4 / (us * 1e-6) / 1e9


class Case:
    def __init__(self, name, shape, flop, nbytes, eager, fused, check):
        self.name, self.shape, self.flop, self.nbytes = name, shape, flop, nbytes
        self.eager, self.fused, self.check = eager, fused, check


# ---- cases --------------------------------------------------------------------------------------
def head_cases(sizes, gamma):
    cases = []
    for batch, dim, classes in sizes:
        z = torch.randn(batch, dim, device=DEVICE) / 8
        labels = torch.randint(0, classes, (batch,), device=DEVICE)
        weight = torch.randn(classes, dim, device=DEVICE) / math.sqrt(dim)
        bias = torch.randn(classes, device=DEVICE)
        log_q = torch.log_softmax(torch.randn(classes, dim, device=DEVICE), dim=1)
        args = (z, labels, weight, bias, log_q, 0.5, 1.0, gamma, None)
        # FLOP: two [B, C, d] GEMMs (logits, (onehot - p) W), + two [B, B, d] ones for the diversity
        # term, + ~10 per feature for the contextual softmax/KL/gradient.
        flop = 4 * batch * classes * dim + (4 * batch * batch * dim if gamma else 0) + 10 * batch * dim
        # Bytes floor: z, W, b, the distinct log Q rows read, the gradient and J written.
        nbytes = 4 * (2 * batch * dim + classes * dim + classes + min(batch, classes) * dim + batch) + 8 * batch
        precisions = ("ieee", "tf32") if GPU else ("ieee",)
        for precision in precisions:

            def fused(args=args, precision=precision):
                return guidance_head(*args, precision=precision)

            def eager(args=args):
                return igds_objective_and_grad(*args)

            tol = 1e-4 if precision == "ieee" else 2e-2

            def check(fused=fused, eager=eager, tol=tol):
                got, want = fused(), eager()
                torch.testing.assert_close(got[1], want[1], rtol=tol, atol=tol * float(want[1].abs().max()))

            name = f"guidance_head ({precision}{', gamma' if gamma else ''})"
            cases.append(Case(name, f"B={batch} d={dim} C={classes}", flop, nbytes, eager, fused, check))
    return cases


def step_cases(batches, image):
    cases = []
    schedule = DiffusionSchedule(ScheduleConfig(), device=DEVICE)
    tables = StepTables(schedule)
    i = 123 % schedule.num_steps
    index = torch.tensor(i, device=DEVICE)
    for batch in batches:
        shape = (3, image, image)
        numel = batch * 3 * image * image
        x = torch.randn(batch, *shape, device=DEVICE)
        model_output = torch.cat([torch.randn(batch, *shape, device=DEVICE),
                                  torch.rand(batch, *shape, device=DEVICE) * 2 - 1], dim=1)
        eps, v = model_output[:, :3], model_output[:, 3:]
        grad = torch.randn_like(x)
        seed_list = [int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(batch)]
        seeds = seeds_to_tensor(seed_list, DEVICE)

        def eager_x0():
            return schedule.predict_x0(x, eps, i)

        def fused_x0():
            return predict_x0(x, model_output, index, tables, True)

        def check_x0():
            torch.testing.assert_close(fused_x0(), eager_x0(), rtol=1e-5, atol=1e-6)

        cases.append(Case("predict_x0", f"B={batch} 3x{image}x{image}", 3 * numel, 12 * numel,
                          eager_x0, fused_x0, check_x0))

        def eager_update():
            # EagerStep's update block with noise="philox" (noise drawn first, then added).
            noise = philox_normal(seeds, i, shape, DEVICE)
            x0 = schedule.predict_x0(x, eps, i)
            mean = schedule.posterior_mean(x0, x, i)
            log_variance = schedule.log_variance(x, i, v)
            mean = mean + 2.0 * torch.exp(log_variance) * grad
            return mean + torch.exp(0.5 * log_variance) * noise

        def fused_update():
            return fused_ddpm_update(x, model_output, index, tables, True, grad=grad, scale=2.0, seeds=seeds)

        def check_update():
            torch.testing.assert_close(fused_update(), eager_update(), rtol=1e-4, atol=1e-4)

        # Floor: read x, eps, v, g, write x_{i-1} (noise generated in registers) = 20 B/element.
        cases.append(Case("fused_ddpm_update (learned sigma, guided, philox)", f"B={batch} 3x{image}x{image}",
                          25 * numel, 20 * numel, eager_update, fused_update, check_update))

        def eager_noise():
            return seeded_normal(seed_list, i, shape, DEVICE)

        def fused_noise():
            return philox_normal(seeds, i, shape, DEVICE)

        def check_noise():
            got = fused_noise()
            assert got.shape == (batch, *shape) and abs(float(got.std()) - 1) < 0.05

        cases.append(Case("philox_normal vs seeded_normal", f"B={batch} 3x{image}x{image}",
                          0, 4 * numel, eager_noise, fused_noise, check_noise))
    return cases


def preprocess_cases(batches, image, resolution):
    cases = []
    module = EncoderPreprocess(resolution, IMAGENET_MEAN, IMAGENET_STD).to(DEVICE)
    for batch in batches:
        x = (torch.rand(batch, 3, image, image, device=DEVICE) * 2 - 1).requires_grad_(True)
        in_numel, out_numel = x.numel(), batch * 3 * resolution * resolution
        eager_y = module(x)
        grad_y = torch.randn_like(eager_y)
        detached = x.detach()

        def eager_fwd():
            with torch.no_grad():
                return module(detached)

        def fused_fwd():
            return preprocess_forward(detached, module.mean_buffer, module.std_buffer, resolution)

        def check_fwd():
            torch.testing.assert_close(fused_fwd(), eager_fwd(), rtol=1e-5, atol=1e-5)

        shape = f"B={batch} 3x{image}^2->{resolution}^2"
        cases.append(Case("preprocess forward", shape, 12 * out_numel, 4 * (in_numel + out_numel),
                          eager_fwd, fused_fwd, check_fwd))

        def eager_bwd():
            return torch.autograd.grad(eager_y, x, grad_y, retain_graph=True)[0]

        def fused_bwd():
            return preprocess_backward(grad_y, module.std_buffer, (image, image))

        def check_bwd():
            torch.testing.assert_close(fused_bwd(), eager_bwd(), rtol=1e-4, atol=1e-5)

        cases.append(Case("preprocess backward", shape, 8 * out_numel, 4 * (in_numel + out_numel),
                          eager_bwd, fused_bwd, check_bwd))
    return cases


def all_cases():
    if GPU:
        sizes = [(64, 2048, 1000), (256, 2048, 1000), (64, 2048, 10), (256, 2048, 10)]
        return (head_cases(sizes, 0.0) + head_cases([(256, 2048, 1000), (256, 2048, 10)], 0.2)
                + step_cases([64, 256], 256) + preprocess_cases([64, 256], 256, 224))
    return (head_cases([(4, 64, 10), (6, 96, 20)], 0.0) + head_cases([(6, 96, 20)], 0.2)
            + step_cases([2], 16) + preprocess_cases([2], 16, 14))


# ---- report -------------------------------------------------------------------------------------
def device_name() -> str:
    if GPU:
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def run(only: str | None = None) -> tuple[str, int]:
    """The results table (markdown) and the number of cases that failed their check or raised.

    A failing case becomes a FAILED row and the rest still run: one bad case never loses the table.
    only: a regex on case names (e.g. "preprocess"); None = every case.
    """
    bandwidth = copy_bandwidth_gbs()
    lines = [
        f"Measured device-to-device copy bandwidth: {bandwidth:.1f} GB/s (read + write).",
        "",
        "| kernel | shape | MFLOP | MB (floor) | floor us | eager us | fused us | speedup | fused GB/s | % copy BW |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    failures = 0
    cases = [c for c in all_cases() if only is None or re.search(only, c.name)]
    if not cases:
        raise SystemExit(f"bench/kernels.py: no case matches --only {only!r}")
    for case in cases:
        floor_us = case.nbytes / (bandwidth * 1e9) * 1e6
        print(f"# {case.name} {case.shape}: {case.flop / 1e6:.3f} MFLOP, {case.nbytes / 1e6:.3f} MB, "
              f"floor {floor_us:.2f} us", file=sys.stderr)
        try:
            case.check()
            eager_us, fused_us = median_us(case.eager), median_us(case.fused)
        except Exception as exc:  # recorded as a row; the other cases still run
            failures += 1
            traceback.print_exc()
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:160].replace("|", "/")
            row = f"| {case.name} | {case.shape} | {case.flop / 1e6:.3f} | {case.nbytes / 1e6:.3f} | {floor_us:.2f} " \
                  f"| FAILED: {message} | | | | |"
        else:
            achieved = case.nbytes / (fused_us * 1e-6) / 1e9
            row = (
                f"| {case.name} | {case.shape} | {case.flop / 1e6:.3f} | {case.nbytes / 1e6:.3f} | {floor_us:.2f} "
                f"| {eager_us:.1f} | {fused_us:.1f} | {eager_us / fused_us:.3f}x | {achieved:.2f} "
                f"| {100 * achieved / bandwidth:.1f}% |"
            )
        print(row, file=sys.stderr, flush=True)  # each row as measured: a run cut short keeps them in its log
        lines.append(row)
    if not GPU:
        lines += ["", "CPU interpreter run: a smoke test of the script only — absolute numbers and ratios "
                  "mean nothing (numpy executes every Triton program)."]
    return "\n".join(lines), failures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--only", default=None, help="run only the cases whose name matches this regex")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    table, failures = run(args.only)
    print(table)
    if args.append_results:
        command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
        header = [
            "",
            f"## bench/kernels.py — {device_name()}{' — Triton interpreter, smoke only' if not GPU else ''}",
            "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}",
            f"- command: `{command}`",
            "",
            "",
        ]
        with open(RESULTS, "a") as handle:
            handle.write("\n".join(header) + table + "\n")
    if failures:
        raise SystemExit(f"bench/kernels.py: {failures} case(s) FAILED (rows above)")


if __name__ == "__main__":
    main()
