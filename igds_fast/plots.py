"""Small line plots as PNG, drawn with PIL (no plotting library needed): panels side by side, one line per series.

    save_line_panels("trace.png", steps, [("log p(y|x0)", {"n01440764": [...], ...}), ...], x_label="sampling step")

NaN values break a line (a step without a value). Colours cycle through a fixed palette; a legend
lists at most `LEGEND_MAX` series.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

from .imageio import write_bytes_atomic

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
LEGEND_MAX = 10
PANEL_W, PANEL_H, MARGIN = 320, 240, 36


def _ticks(low: float, high: float) -> tuple[float, float]:
    if not math.isfinite(low) or not math.isfinite(high):
        return 0.0, 1.0
    if high - low < 1e-12:
        return low - 0.5, high + 0.5
    pad = 0.05 * (high - low)
    return low - pad, high + pad


def save_line_panels(path: str, x: Sequence[float], panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]],
                     x_label: str = "", x_log: bool = False) -> None:
    """Write the panels as one PNG (atomically). x_log: a logarithmic x axis, each x value labelled
    below it and marked on every line (x must be > 0)."""
    import io

    labels = list(x)
    if x_log:
        x = [math.log10(v) for v in x]
    width = PANEL_W * len(panels)
    names = list(panels[0][1]) if panels else []
    legend_rows = min(len(names), LEGEND_MAX)
    height = PANEL_H + 16 + 14 * legend_rows
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x_low, x_high = _ticks(min(x), max(x)) if len(x) > 1 else (0.0, 1.0)
    for p, (title, series) in enumerate(panels):
        left, top = p * PANEL_W + MARGIN, 22
        right, bottom = (p + 1) * PANEL_W - 8, PANEL_H - 22
        values = [v for ys in series.values() for v in ys if v is not None and math.isfinite(v)]
        y_low, y_high = _ticks(min(values), max(values)) if values else (0.0, 1.0)
        draw.rectangle([left, top, right, bottom], outline="#888888")
        draw.text((left, 4), title, fill="black")
        draw.text((left - MARGIN + 2, top), f"{y_high:.3g}", fill="#444444")
        draw.text((left - MARGIN + 2, bottom - 10), f"{y_low:.3g}", fill="#444444")

        def point(xv, yv):
            return (left + (xv - x_low) / (x_high - x_low) * (right - left),
                    bottom - (yv - y_low) / (y_high - y_low) * (bottom - top))

        if x_log:
            for xv, text in zip(x, labels):
                draw.text((point(xv, y_low)[0] - 6, bottom + 4), f"{text:g}", fill="#444444")
            draw.text((right - 60, bottom + 14), x_label, fill="#444444")
        else:
            draw.text((left, bottom + 4), f"{min(x):.3g}", fill="#444444")
            draw.text((right - 50, bottom + 4), f"{max(x):.3g} {x_label}", fill="#444444")

        for s, (_, ys) in enumerate(series.items()):
            colour = PALETTE[s % len(PALETTE)]
            run: list[tuple[float, float]] = []
            for xv, yv in zip(x, ys):
                if yv is None or not math.isfinite(yv):
                    if len(run) > 1:
                        draw.line(run, fill=colour, width=2)
                    run = []
                    continue
                run.append(point(xv, yv))
            if x_log:
                for cx, cy in (point(xv, yv) for xv, yv in zip(x, ys) if yv is not None and math.isfinite(yv)):
                    draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
            if len(run) > 1:
                draw.line(run, fill=colour, width=2)
            elif len(run) == 1:
                cx, cy = run[0]
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
    for s, name in enumerate(names[:LEGEND_MAX]):
        y = PANEL_H + 8 + 14 * s
        draw.rectangle([MARGIN, y + 3, MARGIN + 12, y + 9], fill=PALETTE[s % len(PALETTE)])
        draw.text((MARGIN + 18, y), name, fill="black")
    if len(names) > LEGEND_MAX:
        draw.text((MARGIN + 220, PANEL_H + 8), f"(+{len(names) - LEGEND_MAX} more series)", fill="#444444")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


__all__ = ["save_line_panels"]
