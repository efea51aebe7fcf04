"""Histograms for the summary, binned here and drawn by the template as inline SVG."""

from __future__ import annotations

from dataclasses import dataclass, field

WIDTH, HEIGHT, BASE = 360, 120, 104  # BASE: the bars' baseline, leaving room below for the range


@dataclass
class Histogram:
    title: str
    bars: list[dict] = field(default_factory=list)
    low: str = ""
    high: str = ""
    peak: int = 0
    width: int = WIDTH
    height: int = HEIGHT
    base: int = BASE


def histogram(title: str, values: list[float], bins: int = 20, digits: int = 0) -> Histogram:
    """`values` in `bins` equal bins between their least and greatest; no values, no bars."""
    chart = Histogram(title)
    if not values:
        return chart
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    counts = [0] * bins
    for value in values:
        counts[min(int((value - low) / span * bins), bins - 1)] += 1
    chart.peak, step = max(counts), WIDTH / bins
    for number, count in enumerate(counts):
        height = round((BASE - 16) * count / chart.peak, 1)
        start, end = low + span * number / bins, low + span * (number + 1) / bins
        chart.bars.append({"x": round(number * step + 1, 1), "y": round(BASE - height, 1), "w": round(step - 2, 1),
                           "h": height, "count": count, "label": f"{start:.{digits}f} to {end:.{digits}f}"})
    chart.low, chart.high = f"{low:.{digits}f}", f"{high:.{digits}f}"
    return chart
