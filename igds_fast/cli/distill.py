"""`igds-fast distill`: one distillation run (igds_fast.distill), or the embedded digits demo."""
from __future__ import annotations

import argparse
import json
import os
import sys

from igds_fast.calibrate import read_beta_table
from igds_fast.distill import (DEFAULT_BATCH_SIZE, DEFAULT_CFG_CHANNELS, DEFAULT_CFG_SCALE, DEFAULT_DIT_STEPS,
                               DEFAULT_SCALE, DEFAULT_STEPS, DistillConfig, distill)
from igds_fast.errors import IGDSInputError
from igds_fast.jobs import COMPOSITE_SIZES
from igds_fast.models.adm import ADM_PRESETS
from igds_fast.models.dit import DIT_PRESETS
from igds_fast.models.priors import PRIOR_KINDS
from igds_fast.presets.digits import DEFAULT_WORK_DIR, DigitsSettings, clear_work_dir, format_table, run_digits


def add_parser(subparsers) -> None:
    """Declare `igds-fast distill` (sets handler=run)."""
    parser = subparsers.add_parser(
        "distill",
        help="sample a distilled image folder with IGDS (no arguments: the built-in digits demo)",
        description=(
            "Sample IPC images per class with information-guided diffusion sampling and write "
            "OUT/<class>/<index>.png, OUT/manifest.json and OUT/preview.png. Reruns resume. "
            "Without --prior/--diffusers/--ve (or with --preset digits) it runs the built-in "
            "scikit-learn digits pipeline: train a small prior and VE (cached in --work-dir), "
            "distill IPC 1 and 10, evaluate, and print a table."
        ),
    )
    source = parser.add_argument_group("models")
    source.add_argument("--prior", help="ADM checkpoint (.pt/.safetensors, with --preset), DiT / MinimaxDiffusion "
                                        "checkpoint (recognised by its keys), or a prior file from train_prior")
    source.add_argument("--preset", choices=sorted(ADM_PRESETS) + sorted(DIT_PRESETS) + ["digits"],
                        help="architecture of an ADM or DiT --prior checkpoint; 'digits' runs the built-in demo")
    source.add_argument("--prior-kind", choices=PRIOR_KINDS, default=None,
                        help="what --prior is (default: from --preset, the file's header or its keys)")
    source.add_argument("--vae", metavar="DIR",
                        help="a DiT prior's VAE: a local diffusers AutoencoderKL folder (e.g. sd-vae-ft-mse)")
    source.add_argument("--cfg-scale", type=float, default=None,
                        help=f"a DiT prior's classifier-free guidance scale (default: {DEFAULT_CFG_SCALE:g}; 1 = none)")
    source.add_argument("--cfg-channels", type=int, default=None,
                        help=f"latent channels CFG guides (default: {DEFAULT_CFG_CHANNELS}, as DiT; 4 = all, as diffusers)")
    source.add_argument("--diffusers", metavar="DIR", help="a local diffusers UNet2DModel folder")
    source.add_argument("--noise-schedule", choices=("linear", "cosine"), default=None,
                        help="diffusion of a --diffusers UNet folder without a scheduler config (default: linear)")
    source.add_argument("--ve", help="variational estimator bundle (.safetensors)")
    what = parser.add_argument_group("what to sample")
    what.add_argument("--classes", help="imagewoof | imagenette | imagenet100 | imagenet1k | FILE | indices like 0-9,17 "
                                        "(default: every VE class)")
    what.add_argument("--ipc", type=int, default=None, help="images per class (required, except for the digits demo)")
    what.add_argument("--composite", type=int, choices=COMPOSITE_SIZES, default=None,
                      help="samples per image: 4 = 2x2 composite (default for ADM presets), 1 = one sample")
    what.add_argument("--seed", type=int, default=0, help="global seed; image seeds derive from (seed, class, index)")
    guidance = parser.add_argument_group("guidance")
    guidance.add_argument("--beta", type=float, default=None, help="weight of the contextual term")
    guidance.add_argument("--beta-table", default=None, help="beta per IPC from calibrate-beta (JSON)")
    guidance.add_argument("--scale", type=float, default=None, help=f"guidance scale (default: {DEFAULT_SCALE}; 0 = plain DDPM)")
    guidance.add_argument("--steps", type=int, default=None,
                          help=f"respaced sampling steps (default: {DEFAULT_STEPS}; {DEFAULT_DIT_STEPS} for a DiT prior)")
    guidance.add_argument("--timestep-respacing", default=None, metavar="SPEC",
                          help="guided-diffusion's timestep_respacing instead of --steps: 250, ddim50, 10,20,30 "
                               "(sections of the training steps, each sampled evenly)")
    guidance.add_argument("--guide-from-step", type=int, default=0, metavar="K",
                          help="first guided sampling step (0 = the first step from noise; default: 0)")
    guidance.add_argument("--guide-until-step", type=int, default=None, metavar="K",
                          help="last guided sampling step, inclusive (default: the last; IGD guides 30-45 of 50)")
    guidance.add_argument("--tau", type=float, default=None, help="feature-softmax temperature (default: the VE's)")
    guidance.add_argument("--gamma", type=float, default=0.0, help="diversity (InfoNCE) term weight (default: 0)")
    guidance.add_argument("--mode", choices=("x0", "xt"), default="x0", help="gradient w.r.t. x0_hat or x_t")
    guidance.add_argument("--head", choices=("autograd", "analytic", "triton"), default="autograd")
    guidance.add_argument("--noise", choices=("torch", "philox"), default=None,
                          help="noise source (default: philox for --backend compiled, else torch)")
    guidance.add_argument("--backend", choices=("eager", "compiled"), default="eager",
                          help="eager: the float32 reference; compiled: low-precision torch.compile'd UNet, "
                               "Triton guidance kernels, the step replayed as one CUDA graph")
    guidance.add_argument("--compile-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                          help="compiled backend: compute dtype of the UNet and encoder copies (default: bf16)")
    guidance.add_argument("--compile-options", metavar="JSON", default=None,
                          help='compiled backend: more CompileConfig fields, e.g. \'{"cuda_graphs": false, '
                               '"mode": "default"}\'')
    guidance.add_argument("--batch-invariant", action="store_true",
                          help="eager: step each image alone so its bytes do not depend on the batch size either "
                               "(slower; without it, bytes are identical across world sizes and resumes at one batch size)")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--batch-size", type=int, default=None,
                     help=f"samples per batch (default: {DEFAULT_BATCH_SIZE}; compiled backend: chosen from free "
                          "device memory; digits demo: 100)")
    run_group.add_argument("--out", default=None, help="output folder")
    run_group.add_argument("--force", action="store_true", help="clear an output folder of another configuration")
    run_group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run_group.add_argument("--quiet", action="store_true", help="no progress output")
    run_group.add_argument("--trace", action="store_true",
                           help="also write OUT/trace.json and OUT/trace.png: the guidance terms of every step per class")
    demo = parser.add_argument_group("digits demo (--preset digits or no models)")
    demo.add_argument("--work-dir", default=None, help="cache of the demo's trained pieces and outputs (default: ./igds_work/digits)")
    demo.add_argument("--eval-seeds", type=int, default=None, help="evaluation seeds per method (default: 3)")
    demo.add_argument("--fast", action="store_true", help="tiny settings (smoke test; numbers are meaningless)")
    parser.set_defaults(handler=run)


def _uses_digits_demo(args: argparse.Namespace) -> bool:
    models_given = any(getattr(args, name) for name in ("prior", "diffusers", "ve"))
    if args.preset == "digits":
        if models_given:
            raise IGDSInputError("--preset digits trains its own prior and VE; drop --prior/--diffusers/--ve")
        return True
    if not models_given:
        if args.preset:
            raise IGDSInputError(f"--preset {args.preset} needs --prior CHECKPOINT and --ve BUNDLE")
        return True
    return False


def _compile_options(args: argparse.Namespace) -> dict | None:
    """--compile-options JSON merged with --compile-dtype (None when neither is given)."""
    options: dict = {}
    if args.compile_options is not None:
        try:
            options = json.loads(args.compile_options)
        except json.JSONDecodeError as exc:
            raise IGDSInputError(f"--compile-options is not valid JSON: {exc.msg} at character {exc.pos}") from None
        if not isinstance(options, dict):
            raise IGDSInputError("--compile-options must be a JSON object of CompileConfig fields")
    if args.compile_dtype is not None:
        options["dtype"] = args.compile_dtype
    return options or None


def _steps(args: argparse.Namespace) -> int | str:
    """--steps or --timestep-respacing (not both); None without either."""
    if args.steps is not None and args.timestep_respacing is not None:
        raise IGDSInputError("give --steps or --timestep-respacing, not both")
    if args.timestep_respacing is not None:
        return args.timestep_respacing
    return args.steps  # None = the prior's default (DistillConfig.steps)


def run(args: argparse.Namespace) -> int:
    """The `distill` subcommand: the digits demo or one distillation run. Returns the exit code."""
    if _uses_digits_demo(args):
        return _run_digits(args)
    if not args.ve:
        raise IGDSInputError("give --ve BUNDLE (the variational estimator)")
    if args.ipc is None:
        raise IGDSInputError("give --ipc (images per class)")
    if not args.out:
        raise IGDSInputError("give --out OUT (the output folder)")
    config = DistillConfig(
        ve=args.ve, out=args.out, ipc=args.ipc, prior=args.prior, preset=args.preset, diffusers=args.diffusers,
        classes=args.classes, beta=args.beta, beta_table=args.beta_table,
        scale=DEFAULT_SCALE if args.scale is None else args.scale,
        steps=_steps(args),
        composite=args.composite,
        batch_size=args.batch_size, seed=args.seed, force=args.force,
        device=args.device, tau=args.tau, gamma=args.gamma, mode=args.mode, head=args.head, noise=args.noise,
        backend=args.backend, noise_schedule=args.noise_schedule, progress=not args.quiet,
        batch_invariant=args.batch_invariant, compile_options=_compile_options(args), trace=args.trace,
        prior_kind=args.prior_kind, vae=args.vae, cfg_scale=args.cfg_scale, cfg_channels=args.cfg_channels,
        guide_from_step=args.guide_from_step, guide_until_step=args.guide_until_step,
    )
    manifest = distill(config)
    if "images" not in manifest:
        return 0  # a non-zero torchrun rank: rank 0 merges the manifest and reports the run
    run = manifest["run"]
    rate = f", {run['images_per_s']:.3f} images/s" if run["images_per_s"] else ""
    print(f"distill: {len(manifest['images'])} images in {os.path.abspath(config.out)} "
          f"({run['images_written']} written this run in {run['wall_time_s']:.1f}s{rate})")
    return 0


def _run_digits(args: argparse.Namespace) -> int:
    """`igds-fast distill` without models: run the digits pipeline with the command's overrides."""
    for flag, value in (("--trace", args.trace), ("--timestep-respacing", args.timestep_respacing),
                        ("--prior-kind", args.prior_kind), ("--vae", args.vae), ("--cfg-scale", args.cfg_scale),
                        ("--cfg-channels", args.cfg_channels), ("--guide-from-step", args.guide_from_step),
                        ("--guide-until-step", args.guide_until_step is not None)):
        if value:
            raise IGDSInputError(f"{flag} applies to a distillation run (--prior/--ve), not to the digits demo")
    overrides = {}
    if args.ipc is not None:
        overrides["ipcs"] = (args.ipc,)
    if args.scale is not None:
        overrides["scale"] = args.scale
    if args.beta is not None:
        overrides["beta_by_ipc"] = {1: args.beta}
    if args.beta_table is not None:
        overrides["beta_by_ipc"] = read_beta_table(args.beta_table)
    if args.steps is not None:
        overrides["sampling_steps"] = args.steps
    if args.eval_seeds is not None:
        overrides["seeds"] = args.eval_seeds
    if args.device is not None:
        overrides["device"] = args.device
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    settings = DigitsSettings.fast(**overrides) if args.fast else DigitsSettings(**overrides)
    work_dir = args.work_dir or DEFAULT_WORK_DIR
    if args.force:
        clear_work_dir(work_dir)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    results = run_digits(settings, work_dir, log)
    print(format_table(results))
    print(f"results written to {os.path.join(work_dir, 'results.json')}")
    return 0
