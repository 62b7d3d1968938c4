"""Time the whole guided reverse step: eager fp32, eager half, compiled, compiled + CUDA graphs.

    python bench/sampler.py --presets adm256 --batch-sizes 8,32 --check-fidelity --append-results
    python bench/sampler.py --presets tiny                      # CPU smoke run (no graphs on CPU)
    python bench/sampler.py --presets dit-xl2-256 --batch-sizes 16  # the latent prior (DiT + SD's VAE)
    python bench/sampler.py --presets dit-tiny                  # its CPU smoke run

One process, one run, per preset (random weights; zero-initialised ADM output layers re-drawn so
every layer computes): the ADM prior and a ResNet-50 VE (ResNet-18 for `tiny`) with a 10-class head,
guidance scale 1, beta 0.5, x0 mode (the paper's setting). Every row of a batch size samples the
same (class, seed) jobs: VE classes 0..9 in turn, seeds 1000, 1001, ... Variants, each at every
batch size:

    eager-fp32   backend="eager" timed with PyTorch's defaults (reference_numerics=False: cuDNN may use
                 TF32 convolutions and benchmark-chosen algorithms) and the eager backend's own noise
                 (torch generators per seed) — the faster, conservative baseline; --check-fidelity
                 compares against the true-fp32 deterministic reference (Philox noise, as compiled)
    eager-fp16   the same eager step on fp16 copies of the UNet and the encoder (guided-diffusion's
                 use_fp16; bf16 on CPU, where fp16 convolutions are not a fast path)
    compiled     backend="compiled" (CompileConfig defaults, overridable) with graphs switched off;
                 Philox noise drawn in the fused update kernel
    graphs       the same CompiledStep object replaying its CUDA graph (GPU only)

The peers, what a user would run instead, on the same weights, jobs and guidance settings, in the same
process (each row's "x <peer>" = the peer's s/image over the row's, > 1 = the row is faster):

    gd-fp32      ADM presets: guided-diffusion's own code (guided-diffusion-sdk, as a library): its
                 UNetModel holding our weights (key for key), use_fp16=False, its SpacedDiffusion
                 respaced to 250 steps, the loop of its p_sample_loop, the IGDS gradient supplied by
                 igds_fast.frontends.IGDSConditioner (patched condition_mean, mode x0: no extra UNet call)
    gd-fp16      the same with use_fp16=True and convert_to_fp16() (its fast mode) and a float16 encoder
                 for the gradient (its classifier_use_fp16)
    minimax-b1   DiT presets: DiT's diffusion (guided-diffusion's code; DiT's diffusion/ is a copy)
                 looping DiT's forward_with_cfg (DoubledBatchCFG: [z; z] with [y; null], CFG 4) at batch
                 1, fp32 with TF32 allowed, 50 steps — as MinimaxDiffusion's sample.py runs it — with the
                 same IGDS gradient (through the decoder) for the guided rows, none for the unguided
    minimax      the same at our batch size

The side-by-side table comes first: per preset, guidance and batch, ours compiled+graphs (compiled
where there are no graphs, on CPU; eager fp32 where nothing was compiled) against the fastest peer.
--same-math-rounds (default 8 on CPU, 0 on GPU): our eager fp32 step and gd-fp32's step interleaved,
one step each per round, each side's fastest step kept (load from other processes only adds time),
their ratio in the JSON's "same_math" (tests/test_bench_peers.py checks it on CPU).

Rows come in the order of --variants (bench/gpu_check.sh puts the headline first: graphs, then the
baselines), the fidelity check right after the graphs row (the compiled row without graphs), and
--json / --report are rewritten after every variant, atomically: a run killed at a time limit keeps
every finished row. A variant that fails, to build or to run, becomes its error row; the others run.

Timing: `--warmup` steps first, each timed alone: the first includes torch.compile, autotuning or
graph capture, and its time above a steady step is the row's "compile/capture s" (the first of
compiled / graphs at a batch size and guidance mode carries the compile, "compile+capture" on a
graphs row; a later graphs row the capture alone; a later compiled row nothing); their sum is
"warm-up s". Then `--repeats` blocks of `--steps` steps, each timed between device
synchronisations, the fastest block kept; seconds per image at 250 steps = (block time / steps) *
250 / batch — scaled from the timed steps, not a measured 250-step run (every step of the paper's
setting has the same cost).
FLOPs per image per step come from torch.utils.flop_counter on the meta device: one UNet forward
plus one encoder forward and input-gradient backward (convolutions and matmuls; the head and the
elementwise update are < 0.01% and not counted). Peak: a bf16 matmul 8192^3 measured in the same
run (1024^3 on CPU). Memory: peak allocated above the variant's starting allocation (its
activations, workspaces and graph pool; weights excluded). Ratios compare variants at the same batch.

Latent presets (dit-xl2-256: DiT-XL/2 + SD's VAE decoder (sd-vae-ft-mse's AutoencoderKL config) + a
ResNet-50 VE at 224; dit-tiny: a 2-block DiT + a 2-level AutoencoderKL + ResNet-18 at 16 px, for CPU):
random weights, the DiT under classifier-free guidance (ClassifierFreeGuidance, scale 4.0 as DiT's
sample.py: every forward runs [x; x]), DiT's schedule (linear, 1000 betas, learned sigma) respaced to
50 steps, IGDS scale 1, beta 0.5, x0 not clipped (a latent). Every variant is timed guided (IGDS:
CFG forward + decoder forward + VE forward/backward + decoder backward) and unguided (scale 0: the
CFG forward and the DDPM update only) — the same sampler objects, the guidance scale switched in their
StepContext, so the compiled variants compile once; s/image is at 50 steps. "decoder fwd+bwd ms": the
variant's own decoder (fp32 / half copy / compiled copy) timed alone at the step's batch, forward and
input-gradient backward (torch.autograd.grad w.r.t. the latent), between device synchronisations
(not graph-captured: for the graphs rows it is the compiled decoder's time without graphs);
"decoder share" = that over the guided step's time. FLOPs per image per step from
bench/model_stats.py's latent_step_stats (FlopCounterMode on meta): guided = CFG DiT forward +
decoder forward + encoder forward + encoder and decoder input-gradient backward; unguided = the CFG
DiT forward.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run interpreted on CPU

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python bench/sampler.py`: its parts import as bench.*, from the checkout's root
    sys.path.insert(0, REPO)

from bench.models import (  # noqa: E402
    LATENT_PRESETS, LATENT_STEPS_PER_IMAGE, PRESETS, STEPS_PER_IMAGE, HalfPrecisionPrior, HalfPrecisionVE, build_latent,
    build_prior, build_schedule, build_ve, flops_per_image_step, latent_flops_per_image_step, make_sampler,
    prior_class_map,
)
from bench.peers import PEER_VARIANTS, build_gd_peer, build_minimax_peer, same_math_check  # noqa: E402
from bench.report import add_ratios, format_report  # noqa: E402
from bench.timing import DEVICE, GPU, fidelity, matmul_peak_tflops, time_decoder, time_steps  # noqa: E402
from igds_fast.sampling import Sampler  # noqa: E402
from igds_fast.sampling.compiled import low_precision_copy  # noqa: E402

RESULTS = os.path.join(REPO, "bench", "RESULTS.md")
DEFAULT_BATCHES = {"tiny": (2, 4), "adm64": (16, 64), "adm128": (16, 32), "adm256": (8, 32),
                   "dit-tiny": (2, 4), "dit-xl2-256": (8, 32)}
OUR_VARIANTS = ("eager-fp32", "eager-half", "compiled", "graphs")
VARIANTS = (*OUR_VARIANTS, *PEER_VARIANTS)
GUIDANCE_MODES = ("igds", "none")  # latent presets: guided and unguided rows (ADM presets: guided only)


@contextlib.contextmanager
def guidance_scale(sampler: Sampler, scale: float):
    """The sampler's steps with another guidance scale (0 = unguided), for the block only.

    Every step reads StepContext.guidance_config at call time (guided(i), the update's scale), so one
    sampler (one compile) times both; the compiled step captures one graph per (guided or not, noise kind)."""
    context = sampler.context
    saved = context.guidance_config
    context.guidance_config = dataclasses.replace(saved, scale=scale)
    try:
        yield
    finally:
        context.guidance_config = saved


def applicable_variants(preset: str, variants) -> list[str]:
    """The variants of `variants` that run on `preset` here: graphs on CUDA only, each peer on its kind."""
    kind = "latent" if preset in LATENT_PRESETS else "adm"
    return [v for v in variants if (GPU or v != "graphs") and PEER_VARIANTS.get(v, kind) == kind]


def failure_message(error: Exception) -> str:
    return "out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else (
        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200])


class Results:
    """The rows and checks measured so far, written out after every variant (a killed run keeps them).

    save() rewrites --json (rows, fidelity, same-math, peak, command) and --report (the markdown
    report of bench/report.py) atomically: a temporary file beside the target, then os.replace, so a
    reader never sees half a file, even when the run is killed mid-write."""

    def __init__(self, args, command: str, peak: float, peak_n: int):
        self.args, self.command, self.peak, self.peak_n = args, command, peak, peak_n
        self.rows: list[dict] = []
        self.checks: list[dict] = []

    def report(self) -> str:
        add_ratios(self.rows)
        return format_report(self.rows, self.checks, self.peak, self.peak_n, self.args, self.command)

    def save(self) -> str:
        report = self.report()
        if self.args.json:
            write_atomic(self.args.json, json.dumps(
                {"rows": self.rows, "fidelity": [c for c in self.checks if c["kind"] == "fidelity"],
                 "same_math": [c for c in self.checks if c["kind"] == "same-math"], "peak_tflops": self.peak,
                 "command": self.command}, indent=1))
        if self.args.report:
            write_atomic(self.args.report, report)
        return report


def write_atomic(path: str, text: str) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def overhead_kind(variant: str, first_of_the_compile: bool) -> str | None:
    """What a compiled row's first warm-up step carries: the compile on the first of compiled / graphs
    at a batch shape and guidance mode (torch.compile with dynamic=False compiles per batch shape),
    the capture alone on a later graphs row, nothing on a later compiled row."""
    if variant == "compiled":
        return "compile" if first_of_the_compile else None
    if variant == "graphs":
        return "compile+capture" if first_of_the_compile else "capture"
    return None


def run_preset(preset: str, args, peak_tflops: float, half_dtype, results: Results) -> None:
    """Every variant of `args.variants` at every batch size, in the order given: each row (or error
    row) goes into `results` and is saved at once."""
    rows, checks = results.rows, results.checks
    latent = preset in LATENT_PRESETS
    if latent:
        flops = latent_flops_per_image_step(preset)
        unet, decoder = build_latent(preset, DEVICE)
        image_size = unet.image_size * decoder.scale_factor
        steps_per_image, modes = LATENT_STEPS_PER_IMAGE, args.guidance
    else:
        flops = flops_per_image_step(preset)
        unet, decoder = build_prior(preset, DEVICE), None
        image_size = unet.image_size
        steps_per_image, modes = STEPS_PER_IMAGE, ("igds",)
    gflops = dict(unet_gflop=flops["unet"] / 1e9, encoder_gflop=flops["encoder"] / 1e9)
    if latent:
        gflops.update(decoder_gflop=flops["decoder"] / 1e9, unguided_gflop=flops["unguided"] / 1e9)
    ve = build_ve(preset, image_size, DEVICE)
    schedule = build_schedule(preset, DEVICE)
    class_map = prior_class_map(unet)
    half_name = "eager-fp16" if half_dtype == torch.float16 else "eager-bf16"
    variants = applicable_variants(preset, args.variants)
    options = dict(json.loads(args.compile_options)) if args.compile_options else {}
    # Timed baselines: plain PyTorch numerics and the eager backend's own noise ("torch" generators, as
    # guided-diffusion's randn; the Philox stream of the compiled rows is a Triton kernel, interpreted
    # on CPU); the fidelity reference: true fp32, deterministic, Philox (the compiled rows' noise).
    # The peers take the IGDS guidance (VE, head, decoder) and the class map from `eager`.
    eager = make_sampler(unet, schedule, ve, class_map, reference=False, decoder=decoder, noise="torch")
    reference = make_sampler(unet, schedule, ve, class_map, decoder=decoder) if args.check_fidelity else None

    def build(kind: str):
        if kind == "eager-half":
            half_unet = HalfPrecisionPrior(unet, half_dtype) if latent else low_precision_copy(unet, half_dtype,
                                                                                              channels_last=False)
            half_decoder = None if decoder is None else low_precision_copy(decoder, half_dtype, channels_last=False)
            return make_sampler(half_unet, schedule, HalfPrecisionVE(ve, half_dtype), class_map, reference=False,
                                decoder=half_decoder, noise="torch")
        if kind == "compiled":
            return make_sampler(unet, schedule, ve, class_map, "compiled", options, decoder=decoder)
        if latent:
            return build_minimax_peer(unet, eager, class_map, batch_one=kind == "minimax-b1")
        return build_gd_peer(preset, unet, eager, class_map, use_fp16=kind == "gd-fp16")

    built: dict[str, object] = {"eager-fp32": eager}

    def runner(variant: str):
        """The variant's sampler or peer, built on first use; a build failure is that variant's error."""
        kind = "compiled" if variant == "graphs" else variant
        if kind not in built:
            try:
                built[kind] = build(kind)
            except Exception as error:  # noqa: BLE001 - the variant's error row, the others still run
                traceback.print_exc()
                built[kind] = error
        if isinstance(built[kind], Exception):
            raise built[kind]
        return built[kind]

    def record(row: dict) -> None:
        rows.append(row)
        results.save()

    compiled_at = set()  # (batch, mode) where the compiled sampler has run: its code exists
    fidelity_after = "graphs" if "graphs" in variants else "compiled"
    for batch in args.batch_sizes:
        decoder_s = {}  # per sampler (the graphs rows share the compiled sampler's decoder)
        for variant in variants:
            peer = variant in PEER_VARIANTS
            name = half_name if variant == "eager-half" else variant
            run_batch = 1 if variant == "minimax-b1" else batch
            if variant == "minimax-b1" and batch != args.batch_sizes[0]:
                continue  # batch 1 whatever our batch: measured once, compared with every batch
            for mode in modes:
                label = f"{preset}/{name}/B{run_batch}" + (f"/{mode}" if latent else "")
                profile = GPU and args.profile == variant and batch == args.batch_sizes[-1] and mode == "igds"
                key = {"preset": preset, "variant": name, "batch": run_batch, **gflops}
                if latent:
                    key["guidance"] = mode
                sampler = None
                try:
                    sampler = None if peer else runner(variant)
                    if peer:
                        result = runner(variant).time(run_batch, args.warmup, args.steps, args.repeats, label,
                                                      guided=mode == "igds")
                    else:
                        if sampler.backend == "compiled":
                            sampler.stepper.use_graphs = variant == "graphs"
                        with guidance_scale(sampler, 0.0) if mode == "none" else contextlib.nullcontext():
                            result = time_steps(sampler, batch, args.warmup, args.steps, label, profile, args.repeats)
                except Exception as error:  # noqa: BLE001 - one failing variant must not cost the others' rows
                    message = failure_message(error)
                    record({**key, "error": message})
                    print(f"[bench] {label}: FAILED {message}", file=sys.stderr, flush=True)
                    traceback.print_exc()
                    if GPU:
                        torch.cuda.empty_cache()
                    continue
                if latent and mode == "igds" and sampler is not None and id(sampler) not in decoder_s:
                    try:
                        decoder_s[id(sampler)] = time_decoder(sampler, batch, args.steps)
                    except Exception as error:  # noqa: BLE001 - the step's row stands without it
                        decoder_s[id(sampler)] = None
                        print(f"[bench] {label}: decoder timing FAILED {type(error).__name__}: {error}"[:300],
                              file=sys.stderr, flush=True)
                        if GPU:
                            torch.cuda.empty_cache()
                step_flops = flops["unguided"] if mode == "none" else flops["total"]
                tflops = step_flops * run_batch / result["step_s"] / 1e12
                kind = None
                if variant in ("compiled", "graphs"):
                    kind = overhead_kind(variant, (batch, mode) not in compiled_at)
                    compiled_at.add((batch, mode))
                row = {
                    **key,
                    "ms_per_step": result["step_s"] * 1e3,
                    "images_per_s": run_batch / (result["step_s"] * steps_per_image),
                    "s_per_image": result["step_s"] * steps_per_image / run_batch,
                    "tflops": tflops, "peak_fraction": tflops / peak_tflops,
                    "work_gib": None if result["work_bytes"] is None else result["work_bytes"] / 2**30,
                    "warmup_s": result["warmup_s"], "first_step_s": result["first_step_s"],
                    "overhead_s": result["overhead_s"], "overhead_kind": kind,
                    "block_ms_per_step": [b * 1e3 for b in result["block_step_s"]],
                    "peer": peer, "steps_per_image": steps_per_image,
                }
                if sampler is not None and sampler.backend == "compiled":
                    row["config"] = compiled_config(sampler, latent)
                extra = ""
                if latent and mode == "igds" and sampler is not None and decoder_s[id(sampler)] is not None:
                    row["decoder_ms"] = decoder_s[id(sampler)] * 1e3
                    row["decoder_share"] = decoder_s[id(sampler)] / result["step_s"]
                    extra = (f", decoder fwd+bwd {row['decoder_ms']:.2f} ms "
                             f"({100 * row['decoder_share']:.0f}% of the step)")
                if kind is not None and result["overhead_s"] is not None:
                    extra += f", {kind} {result['overhead_s']:.1f} s (1st step above a steady one)"
                # Progress as it is measured; the row is saved at once (a run cut short keeps it).
                print(f"[bench] {label}: {result['step_s'] * 1e3:.2f} ms/step, "
                      f"{row['s_per_image']:.3f} s/image @{steps_per_image}, {tflops:.2f} TFLOP/s, "
                      f"warm-up {result['warmup_s']:.1f} s{extra}", file=sys.stderr, flush=True)
                record(row)
            if (args.check_fidelity and variant == fidelity_after and batch == args.batch_sizes[0]
                    and not isinstance(built.get("compiled"), (Exception, type(None)))):
                # Right after the headline row: the graph replay (or the compiled step) against true fp32.
                compiled = built["compiled"]
                compiled.stepper.use_graphs = GPU and "graphs" in variants
                try:
                    checks.append({"preset": preset, "kind": "fidelity", "batch": batch,
                                   "graphs": compiled.stepper.use_graphs,
                                   **fidelity(reference, compiled, batch, args.fidelity_steps)})
                    results.save()
                except Exception:  # noqa: BLE001 - report it, keep the timing rows
                    traceback.print_exc()
        if (batch == args.batch_sizes[0] and args.same_math_rounds and "eager-fp32" in variants
                and "gd-fp32" in variants and not isinstance(built.get("gd-fp32"), Exception)):
            try:
                checks.append({"preset": preset, "kind": "same-math",
                               **same_math_check(eager, runner("gd-fp32"), batch, args.same_math_rounds)})
                results.save()
            except Exception:  # noqa: BLE001 - report it, keep the timing rows
                traceback.print_exc()
        if not isinstance(built.get("compiled"), (Exception, type(None))):
            built["compiled"].stepper.release_graphs()
        if GPU:
            torch.cuda.empty_cache()


def compiled_config(sampler: Sampler, latent: bool) -> str:
    """`bf16/bf16, inductor default, attention sdpa`: what a compiled row ran."""
    config = sampler.stepper.compile_config
    return (f"{config.dtype}/{config.encoder_dtype}" + (f"/{config.decoder_dtype}" if latent else "")
            + f", {config.backend} {config.mode}, attention {sampler.stepper.attention}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny" if not GPU else "adm64,adm256",
                        help=f"comma-separated, of {sorted(PRESETS) + sorted(LATENT_PRESETS)}")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default per preset)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    parser.add_argument("--guidance", default=",".join(GUIDANCE_MODES),
                        help=f"latent presets: comma-separated, of {GUIDANCE_MODES} (IGDS-guided / unguided rows)")
    parser.add_argument("--warmup", type=int, default=3 if GPU else 1)
    parser.add_argument("--steps", type=int, default=5 if GPU else 2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed blocks of --steps steps per row; the fastest block counts")
    parser.add_argument("--same-math-rounds", type=int, default=0 if GPU else 8,
                        help="ADM presets with eager-fp32 and gd-fp32: rounds of the interleaved step-by-step "
                             "comparison of the two (0 = off)")
    parser.add_argument("--compile-options", default=None,
                        help='CompileConfig fields as JSON, e.g. \'{"mode": "default", "backend": "aot_eager"}\'')
    parser.add_argument("--half-dtype", choices=("fp16", "bf16"), default="fp16" if GPU else "bf16")
    parser.add_argument("--check-fidelity", action="store_true", help="teacher-forced compiled vs eager errors")
    parser.add_argument("--fidelity-steps", type=int, default=4)
    parser.add_argument("--profile", choices=VARIANTS, default=None,
                        help="wrap this variant's timed steps (largest batch) in cudaProfilerStart/Stop for nsys")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path (rewritten after "
                                                      "every variant)")
    parser.add_argument("--report", default=None, help="also write the report (markdown) to this path (rewritten "
                                                        "after every variant)")
    parser.add_argument("--append-results", action="store_true", help=f"append the report to {RESULTS}")
    args = parser.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in args.presets if p not in PRESETS and p not in LATENT_PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; known: {sorted(PRESETS) + sorted(LATENT_PRESETS)}")
    explicit_variants = args.variants != parser.get_default("variants")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        parser.error(f"variants must be among {VARIANTS}")
    if explicit_variants:  # a variant asked for by name must run on some preset of the run
        unused = [v for v in args.variants if not any(v in applicable_variants(p, [v]) for p in args.presets)]
        if unused:
            parser.error(f"variants {unused} apply to none of the presets {args.presets} (graphs: CUDA only; "
                         f"gd-*: the ADM presets; minimax*: the DiT presets)")
    if args.warmup < 0 or args.steps < 1 or args.repeats < 1 or not 0 <= args.same_math_rounds <= 200:
        parser.error("--warmup must be >= 0, --steps and --repeats >= 1, --same-math-rounds in [0, 200]")
    args.guidance = [m.strip() for m in args.guidance.split(",") if m.strip()]
    if not args.guidance or any(m not in GUIDANCE_MODES for m in args.guidance):
        parser.error(f"--guidance must be among {GUIDANCE_MODES}")
    args.explicit_batches = args.batch_sizes
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/sampler.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    peak, peak_n = matmul_peak_tflops()
    half_dtype = torch.float16 if args.half_dtype == "fp16" else torch.bfloat16
    results = Results(args, command, peak, peak_n)
    for preset in args.presets:
        batches = args.explicit_batches or ",".join(map(str, DEFAULT_BATCHES[preset]))
        args.batch_sizes = [int(b) for b in batches.split(",")]
        run_preset(preset, args, peak, half_dtype, results)
    report = results.save()
    print(report)
    if args.append_results:
        with open(RESULTS, "a") as handle:
            handle.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
