"""Parameter counts and forward FLOPs of the ADM presets (meta device: no memory, no weights).

FLOPs come from torch.utils.flop_counter.FlopCounterMode (a multiply-add counts 2). On the meta device
SDPA is decomposed into two batched matmuls, so attention is counted (aten.bmm below).

    python bench/model_stats.py [--append-results]
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from igds_fast.models.adm import ADM_PRESETS, build_adm


def preset_stats(name: str) -> dict:
    with torch.device("meta"):
        model = build_adm(name).eval()
        size = model.image_size
        x = torch.randn(1, model.in_channels, size, size)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if model.num_classes else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    by_op = {str(op).replace("aten.", ""): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {
        "preset": name,
        "params": sum(p.numel() for p in model.parameters()),
        "flops": counter.get_total_flops(),
        "by_op": by_op,
    }


def table(rows) -> str:
    lines = [
        "| preset | parameters | forward TFLOP / image | conv | attention (bmm) | linear | 250 steps TFLOP / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        op = r["by_op"]
        lines.append(
            f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['flops'] / 1e12:.3f} | "
            f"{op.get('convolution', 0) / 1e12:.3f} | {op.get('bmm', 0) / 1e12:.4f} | "
            f"{op.get('addmm', 0) / 1e12:.5f} | {250 * r['flops'] / 1e12:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args(argv)
    rows = [preset_stats(name) for name in ADM_PRESETS]
    text = table(rows)
    print(text)
    if args.append_results:
        command = "python bench/model_stats.py" + (" --append-results" if args.append_results else "")
        header = (
            f"\n## ADM preset sizes and FLOPs\n\n- device: CPU, meta device (counting only)\n"
            f"- torch {torch.__version__}\n- date: {datetime.date.today().isoformat()}\n"
            f"- command: `{command}`\n\n"
        )
        with open("bench/RESULTS.md", "a") as f:
            f.write(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
