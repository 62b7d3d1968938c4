"""What IGDSConditioner costs a guided-diffusion loop when it does not guide (scale 0), measured interleaved.

    python bench/conditioner_overhead.py [--rounds 7] [--steps 20] [--batch 4]

guided-diffusion-sdk's own UNetModel and SpacedDiffusion (classifier_sample.py's loop), random weights,
on this machine's device: the loop without a cond_fn, with the patched conditioner at scale 0 and with
the bound (cond_fn) conditioner at scale 0, one run of each per round in turn; the median seconds of
each and their ratios to the plain loop. At scale 0 the conditioner returns before any gradient work
(tests/test_peer_guided_diffusion.py counts: no guidance call, no extra UNet forward), so the ratios
measure only the Python of its per-step check. That check is also timed alone (condition_mean called
directly on one step's p_mean_variance output, many calls) and set beside the plain loop's time per step:
on a shared CPU the loop medians differ by their noise, the direct figure does not.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.models import build_ve  # noqa: E402
from igds_fast import IGDSGuidance  # noqa: E402
from igds_fast.frontends import IGDSConditioner  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    from guided_diffusion import script_util

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    options = {**script_util.model_and_diffusion_defaults(), "image_size": args.image_size, "num_channels": 64,
               "num_res_blocks": 2, "channel_mult": "1,2,2", "attention_resolutions": "16,8", "learn_sigma": True,
               "class_cond": True, "noise_schedule": "linear", "timestep_respacing": str(args.steps)}
    model, _ = script_util.create_model_and_diffusion(**options)
    model = model.to(device).eval()
    ve = build_ve("tiny", args.image_size, device)  # bench's random-weight VE (10 classes)
    y = torch.arange(args.batch, device=device) % 10

    def model_fn(x, t, y=None):
        return model(x, t, y)

    def run(kind: str) -> float:
        _, diffusion = script_util.create_model_and_diffusion(**options)
        cond_fn = None
        if kind != "plain":
            conditioner = IGDSConditioner(IGDSGuidance(ve, beta=0.1), scale=0.0)
            if kind == "patch":
                conditioner.patch(diffusion, model_fn)
            else:
                conditioner.bind(model_fn, diffusion)
            cond_fn = conditioner.cond_fn
        torch.manual_seed(1)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        diffusion.p_sample_loop(model_fn, (args.batch, 3, args.image_size, args.image_size), clip_denoised=True,
                                model_kwargs={"y": y}, cond_fn=cond_fn, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def check_us(kind: str, calls: int = 2000) -> float:
        """Microseconds of one scale-0 condition_mean call, the conditioner's whole per-step work."""
        _, diffusion = script_util.create_model_and_diffusion(**options)
        conditioner = IGDSConditioner(IGDSGuidance(ve, beta=0.1), scale=0.0)
        if kind == "patch":
            conditioner.patch(diffusion, model_fn)
        else:
            conditioner.bind(model_fn, diffusion)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
        t = torch.full((args.batch,), args.steps // 2, device=device, dtype=torch.long)
        with torch.no_grad():
            out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=True, model_kwargs={"y": y})
        for _ in range(50):
            diffusion.condition_mean(conditioner.cond_fn, out, x, t, model_kwargs={"y": y})
        start = time.perf_counter()
        for _ in range(calls):
            diffusion.condition_mean(conditioner.cond_fn, out, x, t, model_kwargs={"y": y})
        return (time.perf_counter() - start) / calls * 1e6

    kinds = ("plain", "patch", "bind")
    run("plain")  # warm-up
    times = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            times[kind].append(run(kind))
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    print(f"guided-diffusion loop, {args.steps} steps, batch {args.batch}, {args.image_size} px, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds:")
    for kind in kinds:
        print(f"  {kind:5s}  median {medians[kind]:.3f} s  ratio to plain {medians[kind] / medians['plain']:.3f}  "
              f"(all: {', '.join(f'{v:.3f}' for v in times[kind])})")
    step_us = medians["plain"] / args.steps * 1e6
    for kind in ("patch", "bind"):
        cost = check_us(kind)
        print(f"  {kind:5s}  scale-0 check alone: {cost:.1f} us per step = {cost / step_us:.3%} of the plain loop's "
              f"{step_us / 1e3:.1f} ms per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
