"""`igds-fast distill`: one distillation run (igds_fast.distill), or the embedded digits demo."""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from igds_fast.calibrate import read_beta_table
from igds_fast.distill import (DEFAULT_BATCH_SIZE, DEFAULT_CFG_CHANNELS, DEFAULT_CFG_SCALE, DEFAULT_DIT_STEPS,
                               DEFAULT_SCALE, DEFAULT_STEPS, DistillConfig, distill, distill_with_selection)
from igds_fast.distill.config import SELECT_METHODS
from igds_fast.distributed import QuietRankError, launched_by_torchrun
from igds_fast.errors import IGDSDiskFullError, IGDSInputError
from igds_fast.jobs import COMPOSITE_SIZES
from igds_fast.models.adm import ADM_PRESETS
from igds_fast.models.dit import DIT_PRESETS
from igds_fast.models.priors import PRIOR_KINDS
from igds_fast.presets.digits import (DEFAULT_WORK_DIR, RESULTS_NAME, DigitsSettings, clear_work_dir, describe_run,
                                     format_table, run_digits)
from igds_fast.threads import torch_threads

# The flags the digits demo takes; any other flag given with the demo is refused, naming it.
DEMO_FLAGS = ("--preset", "--ipc", "--scale", "--beta", "--beta-table", "--steps", "--batch-size", "--out", "--force",
              "--device", "--quiet", "--cpu-threads", "--work-dir", "--eval-seeds", "--fast")
# The flags that only the demo takes: refused for a distillation run.
DEMO_ONLY_FLAGS = ("--work-dir", "--eval-seeds", "--fast")


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
            "distill IPC 1 and 10 into --out (default: --work-dir), evaluate, and print a table; "
            "flags that do not apply to it are refused."
        ),
    )
    source = parser.add_argument_group("models")
    source.add_argument("--prior", help="ADM checkpoint (.pt/.safetensors, with --preset), DiT / MinimaxDiffusion "
                                        "checkpoint (recognised by its keys), a prior file from train_prior, or a diffusers "
                                        "folder (flat as google/ddpm-cifar10-32, or a pipeline root)")
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
                        help="diffusion of a diffusers folder (--diffusers or --prior DIR) without a scheduler "
                             "config (default: linear)")
    source.add_argument("--ve", help="variational estimator bundle (.safetensors)")
    what = parser.add_argument_group("what to sample")
    what.add_argument("--classes", help="imagewoof | imagenette | imagenet100 | imagenet1k | tinyimagenet | cifar10 | FILE | "
                                        "indices like 0-9,17 "
                                        "(default: every VE class)")
    what.add_argument("--ipc", type=int, default=None, help="images per class (required, except for the digits demo)")
    what.add_argument("--composite", type=int, choices=COMPOSITE_SIZES, default=None,
                      help="samples per image: 4 = 2x2 composite (default for ADM presets), 1 = one sample")
    what.add_argument("--seed", type=int, default=None,
                      help="global seed; image seeds derive from (seed, class, index) (default: 0)")
    guidance = parser.add_argument_group("guidance")
    guidance.add_argument("--beta", type=float, default=None, help="weight of the contextual term")
    guidance.add_argument("--beta-table", default=None, help="beta per IPC from calibrate-beta (JSON)")
    guidance.add_argument("--scale", type=float, default=None, help=f"guidance scale (default: {DEFAULT_SCALE}; 0 = plain DDPM)")
    guidance.add_argument("--steps", type=int, default=None,
                          help=f"respaced sampling steps (default: {DEFAULT_STEPS}; {DEFAULT_DIT_STEPS} for a DiT prior)")
    guidance.add_argument("--timestep-respacing", default=None, metavar="SPEC",
                          help="guided-diffusion's timestep_respacing instead of --steps: 250, ddim50, 10,20,30 "
                               "(sections of the training steps, each sampled evenly)")
    guidance.add_argument("--guide-from-step", type=int, default=None, metavar="K",
                          help="first guided sampling step (0 = the first step from noise; default: 0)")
    guidance.add_argument("--guide-until-step", type=int, default=None, metavar="K",
                          help="last guided sampling step, inclusive (default: the last; IGD guides 30-45 of 50)")
    guidance.add_argument("--tau", type=float, default=None, help="feature-softmax temperature (default: the VE's)")
    guidance.add_argument("--gamma", type=float, default=None, help="diversity (InfoNCE) term weight (default: 0)")
    guidance.add_argument("--mode", choices=("x0", "xt"), default=None,
                          help="gradient w.r.t. x0_hat or x_t (default: x0)")
    guidance.add_argument("--head", choices=("autograd", "analytic", "triton"), default=None,
                          help="the guidance head of the eager backend (default: autograd)")
    guidance.add_argument("--noise", choices=("torch", "philox"), default=None,
                          help="noise source (default: philox for --backend compiled, else torch)")
    guidance.add_argument("--backend", choices=("eager", "compiled"), default=None,
                          help="eager (default): the float32 reference; compiled: low-precision torch.compile'd "
                               "UNet, Triton guidance kernels, the step replayed as one CUDA graph")
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
    run_group.add_argument("--out", default=None,
                           help="output folder (digits demo: its distilled/ sets and results; default: --work-dir)")
    run_group.add_argument("--force", action="store_true", help="clear an output folder of another configuration")
    run_group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run_group.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                           help="CPU runs: torch intra-op threads of each process (default: 1, whatever the world "
                                "size, so the bytes do not depend on it; another N gives the bytes of N)")
    run_group.add_argument("--quiet", action="store_true", help="no progress output")
    run_group.add_argument("--profile-steps", default=None, metavar="A:B",
                           help="open the CUDA profiler (cudaProfilerStart/Stop: what profiling/nsys.sh captures) "
                                "around sampling steps A..B-1 of the first batch (0 = the first step from noise, "
                                "B excluded; default: $IGDS_PROFILE_STEPS; a no-op without CUDA)")
    run_group.add_argument("--trace", action="store_true",
                           help="also write OUT/trace.json and OUT/trace.png: the guidance terms of every step per class")
    select = parser.add_argument_group("subgroup selection (S³: sample G x IPC per class, keep the best IPC)")
    select.add_argument("--select", choices=SELECT_METHODS, default=None,
                        help="s3: sample --groups subgroups of IPC images per class and keep one per class, "
                             "close to the class's real centroid and far from the other classes (needs --real)")
    select.add_argument("--groups", type=int, default=None, metavar="G", help="candidate subgroups per class (default: 5)")
    select.add_argument("--select-alpha", type=float, default=None, help="weight of the closeness-to-real term (default: 0.4)")
    select.add_argument("--select-beta", type=float, default=None,
                        help="weight of the between-class separation term (default: 0.9)")
    select.add_argument("--select-eps", type=float, default=None, help="added to every distance inside the logs (default: 0)")
    select.add_argument("--select-max-passes", type=int, default=None,
                        help="most coordinate-ascent passes (default: 5; 0 = the closest-to-real start)")
    select.add_argument("--select-encoder", metavar="CKPT", default=None,
                        help="torchvision-layout ResNet-18/50 checkpoint for the features (224 px, ImageNet "
                             "normalisation; default: the VE's own encoder)")
    select.add_argument("--real", metavar="DIR", default=None,
                        help="ImageFolder of real training images (class folders named as the classes)")
    select.add_argument("--real-per-class", type=int, default=None, metavar="N",
                        help="real images per class for the real centroid, drawn with a fixed seed (default: 200)")
    select.add_argument("--candidates", metavar="DIR", default=None,
                        help="folder of the G x IPC candidates and the selection's files (default: OUT.s3-candidates "
                             "beside OUT; never inside OUT)")
    demo = parser.add_argument_group("digits demo (--preset digits or no models)")
    demo.add_argument("--work-dir", default=None,
                      help="cache of the demo's trained prior and VE, and its outputs without --out "
                           "(default: ./igds_work/digits)")
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


@functools.lru_cache(maxsize=1)
def _flag_table() -> tuple[tuple[str, str, object], ...]:
    """(flag, dest, default) of every option of `distill`, read off the parser itself (so a new flag
    is covered by the refusals below without being listed there)."""
    subparsers = argparse.ArgumentParser().add_subparsers()
    add_parser(subparsers)
    parser = subparsers.choices["distill"]
    return tuple((action.option_strings[0], action.dest, action.default)
                 for action in parser._actions if action.option_strings and action.dest != "help")


def given_flags(args: argparse.Namespace) -> list[str]:
    """The flags given on the command line: those whose value differs from their default (in parser order)."""
    return [flag for flag, dest, default in _flag_table() if getattr(args, dest, default) != default]


def _or(value, default):
    return default if value is None else value


def _resolved_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_threads(args: argparse.Namespace, device: str) -> int | None:
    """The intra-op thread count a CPU run is pinned to (--cpu-threads, default 1); None off the CPU.

    Pinned, not inherited: torchrun sets OMP_NUM_THREADS=1 only for more than one rank, and a CPU
    run's bytes depend on the thread count, so without a fixed count 1 and N ranks would differ.
    """
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise IGDSInputError(f"--cpu-threads must be a positive integer, got {args.cpu_threads}")
    if not device.startswith("cpu"):
        if args.cpu_threads is not None:
            raise IGDSInputError(f"--cpu-threads applies to CPU runs only; this one runs on {device}")
        return None
    return _or(args.cpu_threads, 1)


def _resumable(exc: IGDSDiskFullError) -> IGDSDiskFullError:
    """The one line of a full disk during distill: which folder, and that a rerun resumes."""
    return IGDSDiskFullError(
        exc.folder,
        f"no space left on the device holding {exc.folder}: nothing partial was kept; free space (or choose "
        "another --out) and rerun the same command: it resumes, keeping every finished image",
    )


def run(args: argparse.Namespace) -> int:
    """The `distill` subcommand: the digits demo or one distillation run. Returns the exit code."""
    try:
        if _uses_digits_demo(args):
            return _run_digits(args)
        return _run_distill(args)
    except IGDSDiskFullError as exc:
        raise _resumable(exc) from exc


def _run_distill(args: argparse.Namespace) -> int:
    demo_only = [flag for flag in given_flags(args) if flag in DEMO_ONLY_FLAGS]
    if demo_only:
        raise IGDSInputError(f"{', '.join(demo_only)} {'applies' if len(demo_only) == 1 else 'apply'} to the "
                             "digits demo (no --prior/--ve), not to a distillation run")
    if not args.ve:
        raise IGDSInputError("give --ve BUNDLE (the variational estimator)")
    if args.ipc is None:
        raise IGDSInputError("give --ipc (images per class)")
    if not args.out:
        raise IGDSInputError("give --out OUT (the output folder)")
    threads = _cpu_threads(args, _resolved_device(args.device))
    config = DistillConfig(
        ve=args.ve, out=args.out, ipc=args.ipc, prior=args.prior, preset=args.preset, diffusers=args.diffusers,
        classes=args.classes, beta=args.beta, beta_table=args.beta_table,
        scale=_or(args.scale, DEFAULT_SCALE),
        steps=_steps(args),
        composite=args.composite,
        batch_size=args.batch_size, seed=_or(args.seed, 0), force=args.force,
        device=args.device, tau=args.tau, gamma=_or(args.gamma, 0.0), mode=_or(args.mode, "x0"),
        head=_or(args.head, "autograd"), noise=args.noise,
        backend=_or(args.backend, "eager"), noise_schedule=args.noise_schedule, progress=not args.quiet,
        batch_invariant=args.batch_invariant, compile_options=_compile_options(args), trace=args.trace,
        prior_kind=args.prior_kind, vae=args.vae, cfg_scale=args.cfg_scale, cfg_channels=args.cfg_channels,
        guide_from_step=_or(args.guide_from_step, 0), guide_until_step=args.guide_until_step,
        profile_steps=args.profile_steps,
        select=args.select, groups=args.groups, select_alpha=args.select_alpha, select_beta=args.select_beta,
        select_eps=args.select_eps, select_max_passes=args.select_max_passes, select_encoder=args.select_encoder,
        real=args.real, real_per_class=args.real_per_class, candidates=args.candidates,
    )
    with torch_threads(threads):
        # --select s3: the candidates through distill(), then the selection stages (distill/select_stage.py).
        manifest = distill_with_selection(config) if config.select else distill(config)
    if "images" not in manifest:
        return 0  # a non-zero torchrun rank: rank 0 merges the manifest and reports the run
    run = manifest["run"]
    rate = f", {run['images_per_s']:.3f} images/s" if run["images_per_s"] else ""
    print(f"distill: {len(manifest['images'])} images in {os.path.abspath(config.out)} "
          f"({run['images_written']} written this run in {run['wall_time_s']:.1f}s{rate})")
    return 0


def _check_demo_flags(args: argparse.Namespace) -> None:
    """Refuse, in one line, torchrun and every flag the digits demo does not take."""
    if launched_by_torchrun():
        message = ("the digits demo runs in one process: start it without torchrun (igds-fast distill); "
                   "torchrun shards a distillation run (--prior/--ve)")
        # Only rank 0 reports it: the other ranks exit non-zero without repeating it.
        raise IGDSInputError(message) if os.environ.get("RANK", "0") == "0" else QuietRankError(message)
    refused = [flag for flag in given_flags(args) if flag not in DEMO_FLAGS]
    if refused:
        raise IGDSInputError(f"{', '.join(refused)} {'applies' if len(refused) == 1 else 'apply'} to a "
                             "distillation run (--prior/--ve), not to the digits demo")
    for flag, path in (("--work-dir", args.work_dir), ("--out", args.out)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise IGDSInputError(f"{flag} {path} exists and is not a folder")


def _run_digits(args: argparse.Namespace) -> int:
    """`igds-fast distill` without models: run the digits pipeline with the command's overrides."""
    _check_demo_flags(args)
    overrides = {"threads": _cpu_threads(args, args.device or "cpu")}  # the demo runs on the CPU by default
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
    out_dir = args.out or work_dir
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    log(describe_run(settings, work_dir, out_dir, fast=args.fast))
    if args.force:
        clear_work_dir(work_dir, out_dir)
    results = run_digits(settings, work_dir, log, out_dir=out_dir)
    print(format_table(results))
    print(f"results written to {os.path.join(out_dir, RESULTS_NAME)}")
    return 0
