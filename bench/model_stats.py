"""Parameter counts and forward FLOPs of the ADM presets (meta device: no memory, no weights).

FLOPs per image (batch 1, one UNet forward) are measured with torch.utils.flop_counter.FlopCounterMode,
which counts matrix products and convolutions only (a multiply-add counts 2; norms, activations and
softmax are not counted). FlopCounterMode has formulas for the fused CUDA SDPA kernels; on the meta
device SDPA runs its math decomposition, whose two batched matmuls (Q K^T and A V) it counts as
aten.bmm. Every category is checked against a count by formula from forward hooks:

    convolution  2 * out_elements * in_channels/groups * kernel_area   (incl. the 1x1 qkv/proj_out)
    linear       2 * in_features * out_features                         (time/label embedding MLPs)
    attention    2 * T^2 * C  for Q K^T  +  2 * T^2 * C  for A V         (T = H*W tokens, C channels)

    python bench/model_stats.py [--append-results]
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from igds_fast.models.adm import ADM_PRESETS, AttentionBlock, build_adm

COMMAND = "python bench/model_stats.py"


def formula_flops(model: nn.Module, run) -> dict[str, int]:
    """FLOPs by category from the shapes seen by forward hooks while `run()` executes."""
    totals = {"convolution": 0, "linear": 0, "attention": 0}

    def count(module, inputs, output):
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            totals["convolution"] += 2 * output.numel() * per_output
        elif isinstance(module, nn.Linear):
            totals["linear"] += 2 * output.numel() * module.in_features
        elif isinstance(module, AttentionBlock):
            batch, channels = output.shape[:2]
            tokens = math.prod(output.shape[2:])
            totals["attention"] += batch * 2 * (2 * tokens * tokens * channels)

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return totals


def preset_stats(name: str) -> dict:
    """Parameters and forward FLOPs per image of one preset, counted and by formula."""
    with torch.device("meta"):
        model = build_adm(name).eval()
        size = model.image_size
        x = torch.randn(1, model.in_channels, size, size)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if model.num_classes else None

    def run():
        with torch.no_grad():
            model(x, t, y)

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    by_op = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    return {
        "preset": name,
        "params": sum(p.numel() for p in model.parameters()),
        "flops": counter.get_total_flops(),
        "by_op": by_op,
        "formula": formula_flops(model, run),
    }


def table(rows) -> str:
    lines = [
        "| preset | parameters | forward TFLOP / image (counted) | by formula | conv | attention: counted bmm"
        " / formula | linear | 250 steps TFLOP / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        op, formula = r["by_op"], r["formula"]
        attention = sum(n for key, n in op.items() if "bmm" in key or "attention" in key)
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['flops'] / 1e12:.3f} | "
            f"{sum(formula.values()) / 1e12:.3f} | {op.get('convolution', 0) / 1e12:.3f} | "
            f"{attention / 1e9:.2f} / {formula['attention'] / 1e9:.2f} G | {op.get('addmm', 0) / 1e6:.1f} M | "
            f"{250 * r['flops'] / 1e12:.0f} |"
        )
    return "\n".join(lines)


NOTE = (
    "FLOPs: torch.utils.flop_counter.FlopCounterMode on meta tensors, batch 1, one forward, multiply-add = 2 "
    "FLOPs; only matmuls and convolutions are counted. SDPA is counted: on the meta device it runs its math "
    "decomposition, whose Q K^T and A V batched matmuls appear as aten.bmm and equal the formula 4 T^2 C per "
    "attention block. 'by formula' = forward-hook count (conv + linear + attention); it must equal the counted total."
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)
    rows = [preset_stats(name) for name in ADM_PRESETS]
    mismatched = [r["preset"] for r in rows if r["flops"] != sum(r["formula"].values())]
    text = table(rows) + "\n\n" + NOTE + "\n"
    if mismatched:
        text += f"\nWARNING: counted FLOPs differ from the formula for {mismatched}\n"
    print(text)
    if args.append_results:
        header = (
            f"\n## bench/model_stats.py — ADM preset parameters and forward FLOPs\n\n"
            f"- device: CPU, meta device (counting only, no weights allocated)\n"
            f"- torch {torch.__version__}, python {sys.version.split()[0]}\n"
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
            f"- command: `{COMMAND} --append-results`\n\n"
        )
        with open("bench/RESULTS.md", "a") as f:
            f.write(header + text)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
