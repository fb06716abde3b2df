"""Small PNG charts drawn with PIL for materialization metadata (no plotting library needed).

`histogram_png` and `funnel_png` return PNG bytes; `markdown_image` wraps them in a data URI that Dagster's
markdown metadata renders inline in the UI.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 520, 220
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 44, 12, 26, 30
BAR = (70, 110, 200)
LINE = (200, 60, 50)
AXIS = (60, 60, 60)
BG = (255, 255, 255)


def _to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def histogram_png(values: Sequence[float] | np.ndarray, *, title: str, bins: int = 40,
                  value_range: tuple[float, float] | None = None,
                  markers: Sequence[tuple[str, float]] = ()) -> bytes:
    """A histogram of `values` (NaNs ignored) as PNG bytes, with vertical `markers` (label, x) such as a
    keep threshold. `value_range` fixes the x axis (default: the data's min and max)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if value_range is None:
        value_range = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    lo, hi = value_range
    if hi <= lo:
        hi = lo + 1.0
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    img = Image.new("RGB", (WIDTH, HEIGHT), BG)
    draw = ImageDraw.Draw(img)
    x0, x1, y0, y1 = MARGIN_L, WIDTH - MARGIN_R, MARGIN_T, HEIGHT - MARGIN_B
    peak = max(int(counts.max()) if counts.size else 0, 1)
    bar_w = (x1 - x0) / bins
    for i, c in enumerate(counts.tolist()):
        if c:
            top = y1 - (y1 - y0) * c / peak
            draw.rectangle([x0 + i * bar_w + 1, top, x0 + (i + 1) * bar_w - 1, y1], fill=BAR)

    def x_of(value: float) -> float:
        return x0 + (x1 - x0) * (value - lo) / (hi - lo)

    for label, value in markers:
        if lo <= value <= hi:
            x = x_of(value)
            draw.line([x, y0, x, y1], fill=LINE, width=2)
            draw.text((x + 3, y0), f"{label} {value:g}", fill=LINE)
    draw.line([x0, y1, x1, y1], fill=AXIS)
    draw.line([x0, y0, x0, y1], fill=AXIS)
    draw.text((x0, 6), f"{title}  (n={v.size})", fill=AXIS)
    draw.text((4, y0), str(peak), fill=AXIS)
    draw.text((4, y1 - 10), "0", fill=AXIS)
    for value in (edges[0], (edges[0] + edges[-1]) / 2, edges[-1]):
        draw.text((x_of(float(value)) - 12, y1 + 6), f"{value:.2f}", fill=AXIS)
    return _to_png(img)


def funnel_png(stages: Sequence[tuple[str, int]], *, title: str) -> bytes:
    """Horizontal bars, one per (stage, count), widest first: a keep/drop funnel as PNG bytes."""
    height = MARGIN_T + 26 * max(len(stages), 1) + 10
    img = Image.new("RGB", (WIDTH, height), BG)
    draw = ImageDraw.Draw(img)
    draw.text((MARGIN_L, 6), title, fill=AXIS)
    peak = max((c for _, c in stages), default=1) or 1
    label_w = 130
    for i, (label, count) in enumerate(stages):
        y = MARGIN_T + 26 * i
        w = (WIDTH - label_w - 80) * count / peak
        draw.text((6, y + 5), label, fill=AXIS)
        draw.rectangle([label_w, y + 2, label_w + max(w, 1), y + 20], fill=BAR)
        share = f" ({count / peak:.0%})" if i else ""
        draw.text((label_w + w + 6, y + 5), f"{count}{share}", fill=AXIS)
    return _to_png(img)


def markdown_image(png: bytes, alt: str) -> str:
    """Markdown embedding `png` as a data URI (rendered inline by Dagster's markdown metadata)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def counts_markdown(counts: Mapping[str, int], label: str) -> str:
    """A two-column markdown table of counts, largest first (every stage's by-status/by-reason metadata)."""
    lines = [f"| {label} | count |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]
    return "\n".join(lines)
