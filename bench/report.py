"""bench/sampler.py's report: ratios between rows, the side-by-side table with the peers, the targets.

`format_report(rows, checks, peak, peak_n, args, command)` is the markdown bench/sampler.py prints and
appends to bench/RESULTS.md; `add_ratios(rows)` fills each measured row's "x <variant>" columns.
"""
from __future__ import annotations

import datetime
import os
import platform

import torch

from bench.models import CFG_SCALE, LATENT_PRESETS, LATENT_STEPS_PER_IMAGE, STEPS_PER_IMAGE
from bench.peers import PEER_VARIANTS
from bench.timing import GPU

# Acceptance targets (the issue's; never loosened here): (preset, what, limit).
TARGET_S_PER_IMAGE_ADM256 = 1.05
TARGET_SPEEDUP_VS_EAGER_FP32 = 8.0
TARGET_SPEEDUP_VS_EAGER_HALF = 2.0
TARGET_GRAPHS_VS_COMPILED_ADM64_B64 = 2.0


def comparable(rows: list[dict], row: dict, variant: str) -> dict | None:
    """The measured row of `variant` that `row` is compared with: same preset, guidance and batch —
    minimax-b1 (batch 1 whatever ours) at any batch."""
    for other in rows:
        if (other["variant"] == variant and other["preset"] == row["preset"] and "ms_per_step" in other
                and other.get("guidance", "igds") == row.get("guidance", "igds")
                and (other["batch"] == row["batch"] or variant == "minimax-b1")):
            return other
    return None


def add_ratios(rows: list[dict]) -> None:
    """x eager32 / x eager-half / x compiled (same batch: step-time ratios) and x <peer> (s/image
    ratios: the peer's s/image over the row's, > 1 = the row is faster) on every measured row."""
    for row in rows:
        if "ms_per_step" not in row:
            continue
        for field, variant in (("vs_eager_fp32", "eager-fp32"), ("vs_eager_half", "eager-fp16"),
                               ("vs_eager_half", "eager-bf16"), ("vs_compiled", "compiled")):
            baseline = comparable(rows, row, variant)
            if baseline is not None or field not in row:
                row[field] = None if baseline is None else baseline["ms_per_step"] / row["ms_per_step"]
        for variant in PEER_VARIANTS:
            baseline = comparable(rows, row, variant)
            row[f"vs_{variant}"] = None if baseline is None else baseline["s_per_image"] / row["s_per_image"]


def best_peer(rows: list[dict], row: dict) -> dict | None:
    """The fastest peer row (s/image) comparable with `row`."""
    found = [r for r in (comparable(rows, row, v) for v in PEER_VARIANTS) if r is not None]
    return min(found, key=lambda r: r["s_per_image"]) if found else None


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's acceptance targets against what this run measured ('open' where it did not)."""
    def best(preset, variant, batch=None):
        found = [r for r in rows if r["preset"] == preset and r["variant"] == variant and "ms_per_step" in r
                 and (batch is None or r["batch"] == batch)]
        return min(found, key=lambda r: r["s_per_image"]) if found else None

    def status(ok):
        return "open (not measured here)" if ok is None else ("PASS" if ok else "FAIL")

    graphs256 = best("adm256", "graphs") if GPU else None
    lines = []
    value = None if graphs256 is None else graphs256["s_per_image"]
    shown = "-" if value is None else f"{value:.3f} (B={graphs256['batch']})"
    lines.append(f"| adm256 compiled+graphs s/image (250 steps) <= {TARGET_S_PER_IMAGE_ADM256} | {shown} | "
                 f"{status(None if value is None else value <= TARGET_S_PER_IMAGE_ADM256)} |")
    half = next((r["variant"] for r in rows if r["preset"] == "adm256" and r["variant"].startswith("eager-")
                 and r["variant"] != "eager-fp32"), "eager-fp16")
    for key, limit, what in (("vs_eager_fp32", TARGET_SPEEDUP_VS_EAGER_FP32, "eager fp32"),
                             ("vs_eager_half", TARGET_SPEEDUP_VS_EAGER_HALF, f"eager fp16 (measured: {half})"),
                             ("vs_gd-fp16", TARGET_SPEEDUP_VS_EAGER_HALF,
                              "guided-diffusion's own fp16 sampler (gd-fp16)")):
        ratio = None if graphs256 is None else graphs256.get(key)
        shown = "-" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"| adm256 compiled+graphs >= {limit}x {what} (same batch) | {shown} | "
                     f"{status(None if ratio is None else ratio >= limit)} |")
    graphs64 = best("adm64", "graphs", 64) if GPU else None
    ratio = None if graphs64 is None else graphs64.get("vs_compiled")
    lines.append(f"| adm64 B=64 graphs >= {TARGET_GRAPHS_VS_COMPILED_ADM64_B64}x compiled without graphs | "
                 f"{'-' if ratio is None else f'{ratio:.2f}x'} | "
                 f"{status(None if ratio is None else ratio >= TARGET_GRAPHS_VS_COMPILED_ADM64_B64)} |")
    return lines


def overhead(row: dict) -> str:
    """The compile / capture seconds of a compiled row (its 1st warm-up step above a steady step)."""
    if row.get("overhead_kind") is None or row.get("overhead_s") is None:
        return "-"
    return f"{row['overhead_s']:.1f} ({row['overhead_kind']})"


# Our row a peer table line shows, in order of preference (a run without graphs or compile falls back).
OUR_NAMES = {"graphs": "compiled+graphs", "compiled": "compiled (no graphs)", "eager-fp32": "eager fp32 (not compiled)"}


def peer_table(rows: list[dict]) -> list[str]:
    """The side-by-side table: ours compiled+graphs (compiled where there are no graphs, on CPU) against
    the fastest peer on the same work, then our eager fp32 step against guided-diffusion's fp32 step."""
    lines = [("Ours vs the peers (same process, weights, (class, seed) jobs and guidance; s/image at the "
              "preset's steps; x = the peer's s/image / ours, > 1 = ours faster):"), "",
             ("| preset | guidance | batch | ours | ours s/image | best peer | peer s/image | x best peer "
              "| our eager fp32 step / gd-fp32 step |"),
             "|---|---|---:|---|---:|---|---:|---:|---:|"]
    groups = []
    for row in rows:
        group = (row["preset"], row.get("guidance", "igds"), row["batch"])
        if not row.get("peer") and group not in groups:
            groups.append(group)
    for preset, mode, batch in groups:
        ours = [r for r in rows if (r["preset"], r.get("guidance", "igds"), r["batch"]) == (preset, mode, batch)
                and "ms_per_step" in r and r["variant"] in OUR_NAMES]
        if not ours:
            continue
        mine = min(ours, key=lambda r: list(OUR_NAMES).index(r["variant"]))  # graphs, else compiled, else eager
        name = OUR_NAMES[mine["variant"]]
        peer = best_peer(rows, mine)
        eager = comparable(rows, mine, "eager-fp32")
        same_math = "-" if eager is None or eager.get("vs_gd-fp32") is None else f"{1 / eager['vs_gd-fp32']:.2f}"
        lines.append(
            f"| {preset} | {mode} | {batch} | {name} | {mine['s_per_image']:.3f} "
            f"| {'-' if peer is None else peer['variant'] + ' (B=' + str(peer['batch']) + ')'} "
            f"| {'-' if peer is None else format(peer['s_per_image'], '.3f')} "
            f"| {'-' if peer is None else format(peer['s_per_image'] / mine['s_per_image'], '.2f')} | {same_math} |")
    return lines


def format_report(rows, checks, peak, peak_n, args, command) -> str:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    device = torch.cuda.get_device_name() if GPU else f"CPU ({os.cpu_count()} cores)"
    import triton

    lines = [
        f"## bench/sampler.py — {device}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"
        + (f", CUDA {torch.version.cuda}" if GPU else ""),
        f"- command: `{command}`",
        f"- measured bf16 matmul peak ({peak_n}^3): {peak:.1f} TFLOP/s",
    ]
    adm_rows = [r for r in rows if r["preset"] not in LATENT_PRESETS]
    latent_rows = [r for r in rows if r["preset"] in LATENT_PRESETS]
    if adm_rows or not latent_rows:
        lines.append(f"- timing: {args.warmup} warm-up steps (compile/autotune/capture), then {args.steps} guided steps "
                     f"timed; s/image scaled to {STEPS_PER_IMAGE} steps")
    else:
        lines.append(f"- timing: {args.warmup} warm-up steps (compile/autotune/capture), then {args.steps} steps timed, "
                     f"guided and unguided; s/image scaled to {LATENT_STEPS_PER_IMAGE} steps")
    if args.repeats > 1:
        lines.append(f"- {args.repeats} timed blocks per row, the fastest counts")
    lines += ["", *peer_table(rows)]
    if adm_rows or not latent_rows:
        lines += [
            "",
            "| preset | variant | batch | ms/step | images/s | s/image @250 | TFLOP/s | % peak | work GiB "
            "| x eager32 | x eager-half | x compiled | x gd-fp32 | x gd-fp16 | compile/capture s | warm-up s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for r in adm_rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['error']} |" + " |" * 12)
            continue
        lines.append(
            f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['ms_per_step']:.2f} | {r['images_per_s']:.3f} "
            f"| {r['s_per_image']:.3f} | {r['tflops']:.2f} | {100 * r['peak_fraction']:.1f}% "
            f"| {num(r['work_gib'], '.2f')} "
            f"| {num(r.get('vs_eager_fp32'), '.2f')} | {num(r.get('vs_eager_half'), '.2f')} "
            f"| {num(r.get('vs_compiled'), '.2f')} | {num(r.get('vs_gd-fp32'), '.2f')} "
            f"| {num(r.get('vs_gd-fp16'), '.2f')} | {overhead(r)} | {r['warmup_s']:.1f} |"
        )
    if latent_rows:
        lines += [
            "",
            f"Latent prior (DiT under classifier-free guidance, scale {CFG_SCALE}, + VAE decoder); guidance "
            f"{' and '.join(args.guidance)} (igds = IGDS-guided steps, none = unguided); s/image scaled to "
            f"{LATENT_STEPS_PER_IMAGE} steps:",
            "",
            f"| preset | variant | guidance | batch | ms/step | images/s | s/image @{LATENT_STEPS_PER_IMAGE} | TFLOP/s "
            "| % peak | work GiB | decoder fwd+bwd ms | decoder share | x eager32 | x eager-half | x compiled "
            "| x minimax-b1 | x minimax | compile/capture s | warm-up s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for r in latent_rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['variant']} | {r['guidance']} | {r['batch']} | {r['error']} |"
                         + " |" * 14)
            continue
        share = r.get("decoder_share")
        lines.append(
            f"| {r['preset']} | {r['variant']} | {r['guidance']} | {r['batch']} | {r['ms_per_step']:.2f} "
            f"| {r['images_per_s']:.3f} | {r['s_per_image']:.3f} | {r['tflops']:.2f} | {100 * r['peak_fraction']:.1f}% "
            f"| {num(r['work_gib'], '.2f')} | {num(r.get('decoder_ms'), '.2f')} "
            f"| {'-' if share is None else f'{100 * share:.0f}%'} "
            f"| {num(r.get('vs_eager_fp32'), '.2f')} | {num(r.get('vs_eager_half'), '.2f')} "
            f"| {num(r.get('vs_compiled'), '.2f')} | {num(r.get('vs_minimax-b1'), '.2f')} "
            f"| {num(r.get('vs_minimax'), '.2f')} | {overhead(r)} | {r['warmup_s']:.1f} |"
        )
    flop_rows = {(r["preset"], r["unet_gflop"], r["encoder_gflop"]) for r in adm_rows}
    lines.append("")
    for preset, unet_gflop, encoder_gflop in sorted(flop_rows):
        lines.append(f"- {preset}: {unet_gflop:.1f} GFLOP UNet forward + {encoder_gflop:.1f} GFLOP encoder "
                     "forward/input-backward per image per step (flop_counter, meta device)")
    latent_flops = {(r["preset"], r["unet_gflop"], r["decoder_gflop"], r["encoder_gflop"], r["unguided_gflop"])
                    for r in latent_rows}
    def gflop(value):
        return f"{value:.1f}" if value >= 10 else f"{value:.3f}"

    for preset, unet_gflop, decoder_gflop, encoder_gflop, unguided_gflop in sorted(latent_flops):
        guided = unet_gflop + decoder_gflop + encoder_gflop
        lines.append(f"- {preset}: guided {gflop(guided)} GFLOP per image per step = {gflop(unet_gflop)} CFG DiT forward "
                     f"+ {gflop(decoder_gflop)} decoder forward/input-backward ({100 * decoder_gflop / guided:.0f}%) + "
                     f"{gflop(encoder_gflop)} encoder forward/input-backward; unguided {gflop(unguided_gflop)} "
                     "(bench/model_stats.py latent_step_stats, meta device)")
    configs = sorted({r["config"] for r in rows if "config" in r})
    for config in configs:
        lines.append(f"- compiled config: {config}")
    same_math = [c for c in checks if c["kind"] == "same-math"]
    if same_math:
        lines += ["", ("Same math, our eager fp32 step vs guided-diffusion's fp32 step (gd-fp32), interleaved "
                       "step by step, each side's fastest step:"), "",
                  "| preset | batch | rounds | ours ms | gd-fp32 ms | ours / gd-fp32 |", "|---|---:|---:|---:|---:|---:|"]
        for c in same_math:
            lines.append(f"| {c['preset']} | {c['batch']} | {c['rounds']} | {c['ours_ms']:.2f} | {c['gd_fp32_ms']:.2f} "
                         f"| {c['ratio']:.2f} |")
    fidelity_checks = [c for c in checks if c["kind"] == "fidelity"]
    if fidelity_checks:
        lines += ["", "Fidelity, compiled vs eager fp32, teacher-forced (max over steps):", "",
                  "| preset | batch | graphs | steps | UNet output rel L2 | x_{t-1} rel L2 |",
                  "|---|---:|---|---:|---:|---:|"]
        for c in fidelity_checks:
            lines.append(f"| {c['preset']} | {c['batch']} | {c['graphs']} | {c['steps']} "
                         f"| {c['unet_rel']:.2e} | {c['x_rel']:.2e} |")
    lines += ["", "Targets:", "", "| target | measured | status |", "|---|---|---|", *target_lines(rows)]
    if not GPU:
        lines += ["", "CPU run: a smoke test of the script only (Triton kernels interpreted, no CUDA graphs); "
                  "absolute numbers and ratios mean nothing for the GPU targets."]
    return "\n".join(lines) + "\n"


__all__ = ["OUR_NAMES", "add_ratios", "best_peer", "comparable", "format_report", "overhead", "peer_table",
           "target_lines"]
