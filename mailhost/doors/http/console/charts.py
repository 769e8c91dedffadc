"""Charts as inline SVG, drawn on the server: no script, no image requests, and colours
from classes in console.css (the CSP allows no inline style). Each data series is one
element carrying `data-series` and `data-total`, so a test (or a curious admin) can read
what was drawn."""

from __future__ import annotations

import time
from html import escape

WIDTH = 720
HEIGHT = 180
LEFT = 44  # room for the y labels
BOTTOM = 20  # room for the x labels
TOP = 8
COLOURS = 8  # series classes s0..s7 in console.css


def _nice_max(value: float) -> float:
    """A round top for the y axis at or above `value`."""
    if value <= 0:
        return 1.0
    step = 10 ** len(str(int(value))) / 10 if value >= 1 else 0.001
    for factor in (1, 2, 2.5, 5, 10):
        if step * factor >= value:
            return step * factor
    return value


def _number(value: float) -> str:
    return f"{value:g}" if value >= 1 or value == 0 else f"{value:.2g}"


def line_chart(title: str, first: int, step: int, series: dict[str, list[int]]) -> str:
    """One polyline per series over time: `first` is the epoch second of the first value,
    `step` the seconds between values. Empty series still draw their axes."""
    points = max((len(v) for v in series.values()), default=0)
    top = _nice_max(max((max(v) for v in series.values() if v), default=0))
    plot_w, plot_h = WIDTH - LEFT - 4, HEIGHT - TOP - BOTTOM
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">'
             f"<title>{escape(title)}</title>"]
    for fraction in (0, 0.5, 1):
        y = TOP + plot_h * (1 - fraction)
        parts.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - 4}" y2="{y:.1f}"/>'
                     f'<text class="axis" x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{_number(top * fraction)}</text>')
    if points:
        for hours_back in (24, 18, 12, 6, 0):
            index = points - 1 - hours_back * 3600 // step
            if 0 <= index < points:
                x = LEFT + plot_w * index / max(points - 1, 1)
                label = time.strftime("%H:%M", time.gmtime(first + index * step))
                anchor = "end" if hours_back == 0 else "middle"  # the newest at the right edge, not cut off
                parts.append(f'<text class="axis" x="{x:.1f}" y="{HEIGHT - 4}" text-anchor="{anchor}">{label}</text>')
    for number, (name, values) in enumerate(series.items()):
        coords = " ".join(f"{LEFT + plot_w * i / max(points - 1, 1):.1f},{TOP + plot_h * (1 - v / top):.1f}"
                          for i, v in enumerate(values))
        parts.append(f'<polyline class="line s{number % COLOURS}" data-series="{escape(name)}" '
                     f'data-total="{sum(values)}" points="{coords}"><title>{escape(name)}: {sum(values)}</title>'
                     f"</polyline>")
    parts.append("</svg>")
    return "".join(parts) + legend(series)


def legend(series: dict[str, list[int]]) -> str:
    items = "".join(f'<li><span class="swatch b{n % COLOURS}"></span>{escape(name)} '
                    f"<strong>{sum(values)}</strong></li>" for n, (name, values) in enumerate(series.items()))
    return f'<ul class="legend">{items}</ul>'


def bar_chart(title: str, bars: dict[str, float], lines: dict[str, float] | None = None,
              percent: bool = False) -> str:
    """Horizontal bars, one per name, with optional vertical marker lines (name -> value),
    such as the 0.1% and 0.3% complaint-rate limits."""
    lines = lines or {}
    row = 22
    height = TOP + row * max(len(bars), 1) + BOTTOM
    label_w = 160
    plot_w = WIDTH - label_w - 60
    top = _nice_max(max([*bars.values(), *lines.values(), 0]))
    shown = (lambda v: f"{v * 100:.2f}%") if percent else _number
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(title)}">'
             f"<title>{escape(title)}</title>"]
    for number, (name, value) in enumerate(bars.items()):
        y = TOP + row * number
        w = plot_w * value / top
        parts.append(f'<text class="axis" x="{label_w - 6}" y="{y + 15}" text-anchor="end">{escape(name[:30])}</text>'
                     f'<rect class="bar b{number % COLOURS}" x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" '
                     f'data-series="{escape(name)}" data-total="{value:g}"><title>{escape(name)}: {shown(value)}</title></rect>'
                     f'<text class="axis" x="{label_w + w + 4:.1f}" y="{y + 15}">{shown(value)}</text>')
    if not bars:
        parts.append(f'<text class="axis" x="{label_w}" y="{TOP + 15}">nothing yet</text>')
    for name, value in lines.items():
        x = label_w + plot_w * value / top
        parts.append(f'<line class="limit" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{height - BOTTOM}" '
                     f'data-limit="{value:g}"/><text class="axis limit-label" x="{x:.1f}" y="{height - 4}" '
                     f'text-anchor="middle">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
