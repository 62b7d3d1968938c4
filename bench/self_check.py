"""Measure the compiled backend's first-step self-check errors, per part and dtype, at real shapes.

    python bench/self_check.py --models tiny,digits,adm256 --dtypes bf16,fp16,fp32
    python bench/self_check.py --models digits --prior W/prior.safetensors --ve W/ve.safetensors
    python bench/self_check.py --models digits,adm256 --dtypes bf16,fp16 --compile   # on a GPU

What sets igds_fast.sampling.compiled.self_check.SELF_CHECK_TOLERANCES: for every model and dtype, one compiled sampler
(low-precision copies, uncompiled by default — the copies' numerics; --compile adds torch.compile)
runs the first step of a batch with the tolerances lifted, and the check's measured per-image
relative L2 errors (worst image) are printed per part: unet, features, head, gradient, step.

Models (random weights unless a trained prior / VE is given; ADM's zero-initialised output layers
re-drawn so every layer computes):
    tiny     bench/models.py's tiny ADM (16 px) + ResNet-18 VE at 16 px
    digits   the digits demo's architecture (1 channel, 16 px; igds_fast.presets.digits), or the
             trained prior and VE of --prior / --ve
    adm256   the adm256-cond preset + a ResNet-50 VE at 224 px (CPU: about a minute per dtype)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python bench/self_check.py`: its parts import as bench.*, from the checkout's root
    sys.path.insert(0, REPO)

from bench.models import TINY_FLAGS, build_ve, redraw_zero_layers_  # noqa: E402

from igds_fast.sampling.compiled import self_check  # noqa: E402
from igds_fast.guidance import GuidanceConfig  # noqa: E402
from igds_fast.diffusion import DiffusionSchedule, ScheduleConfig  # noqa: E402
from igds_fast.models.adm import ADM_PRESETS, ADMUNet  # noqa: E402
from igds_fast.models.resnet import build_resnet  # noqa: E402
from igds_fast.preprocess import EncoderPreprocess  # noqa: E402
from igds_fast.sampling import Sampler  # noqa: E402
from igds_fast.models.priors import load_prior  # noqa: E402
from igds_fast.train_prior import PriorTrainConfig  # noqa: E402
from igds_fast.ve import VariationalEstimator  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def lifted_tolerances():
    """Every self-check tolerance set to infinity: the check measures and never stops the run."""
    saved = {dtype: dict(parts) for dtype, parts in self_check.SELF_CHECK_TOLERANCES.items()}
    for parts in self_check.SELF_CHECK_TOLERANCES.values():
        for part in parts:
            parts[part] = math.inf
    try:
        yield
    finally:
        for dtype, parts in saved.items():
            self_check.SELF_CHECK_TOLERANCES[dtype].update(parts)


def digits_models(prior: str | None, ve: str | None, device):
    """(unet, schedule config, ve): trained ones when given, else the demo's architecture at random."""
    if prior:
        unet, schedule_config, _ = load_prior(prior, device)
    else:
        flags = PriorTrainConfig().unet_flags(16, 1, 10)
        unet = redraw_zero_layers_(ADMUNet.from_flags(**flags)).to(device).eval()
        schedule_config = ScheduleConfig(noise_schedule="cosine")
    if ve:
        estimator = VariationalEstimator.load(ve, device)
    else:
        encoder = build_resnet("resnet18", num_classes=None, softplus_beta=3.0, in_channels=1)
        dim = encoder.feature_dim
        estimator = VariationalEstimator(
            encoder, torch.randn(10, dim) / math.sqrt(dim) * 4, torch.randn(10) * 0.1,
            torch.log_softmax(torch.randn(10, dim), dim=1), 1.0, EncoderPreprocess(16, (0.5,), (0.25,)),
            [str(c) for c in range(10)],
        ).to(device).eval()
    return unet.requires_grad_(False), schedule_config, estimator


def build(model: str, args):
    """(unet, ScheduleConfig, ve, prior class map) of a model name."""
    if model == "digits":
        unet, schedule_config, ve = digits_models(args.prior, args.ve, DEVICE)
        return unet, schedule_config, ve, None
    flags = TINY_FLAGS if model == "tiny" else ADM_PRESETS["adm256-cond"]
    with torch.device(DEVICE):
        unet = redraw_zero_layers_(ADMUNet.from_flags(**{**flags, "dropout": 0.0})).eval().requires_grad_(False)
    ve = build_ve("tiny" if model == "tiny" else "adm256", unet.image_size, DEVICE)
    return unet, ScheduleConfig(noise_schedule="linear"), ve, list(range(ve.num_classes))


def measure(model: str, dtype: str, args) -> dict:
    unet, schedule_config, ve, class_map = build(model, args)
    schedule = DiffusionSchedule(ScheduleConfig(
        noise_schedule=schedule_config.noise_schedule, diffusion_steps=schedule_config.diffusion_steps,
        sampling_steps=str(args.steps),
    ), device=DEVICE)
    guidance = GuidanceConfig(scale=1.0, beta=args.beta, gamma=args.gamma)
    options = dict(dtype=dtype, compile=args.compile, channels_last=DEVICE.type == "cuda")
    if args.compile_options:
        options.update(json.loads(args.compile_options))
    sampler = Sampler(unet, schedule, ve, guidance, backend="compiled", backend_options=options, noise="philox",
                      prior_class_map=class_map)
    labels = torch.arange(args.batch) % ve.num_classes
    seeds = [1000 + b for b in range(args.batch)]
    started = time.perf_counter()
    with lifted_tolerances(), sampler.batch(labels, seeds) as run:
        run.step()  # the checked first step of a run's first batch
    report = sampler.self_check_report
    return {"model": model, "dtype": dtype, "seconds": time.perf_counter() - started,
            **{part["part"]: part["error"] for part in report["parts"]}}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,digits")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--prior", default=None, help="digits: a trained prior file (train-prior / the demo's)")
    parser.add_argument("--ve", default=None, help="digits: a trained VE bundle")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="respaced steps (the first step is checked)")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--gamma", type=float, default=0.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the copies (inductor)")
    parser.add_argument("--compile-options", default=None, metavar="JSON", help="more CompileConfig fields")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - {"tiny", "digits", "adm256"}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    print(f"device {DEVICE}, torch {torch.__version__}, batch {args.batch}, compile {args.compile}")
    print(f"{'model':8s} {'dtype':5s} " + " ".join(f"{p:>9s}" for p in self_check.PARTS) + "   seconds")
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            row = measure(model, dtype, args)
            cells = " ".join(f"{row[p]:9.2e}" if p in row else f"{'-':>9s}" for p in self_check.PARTS)
            print(f"{model:8s} {dtype:5s} {cells}   {row['seconds']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
