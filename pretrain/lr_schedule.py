"""Piecewise-linear learning-rate schedules, positioned in steps or in tokens.

A schedule is a list of [position, fraction of the peak lr] points, linear in between and held after
the last. Warmup-stable-decay is three or more points; the paper's drop from 4e-4 to 1e-4 at 1.2T
tokens is two points at the same position.
"""

from __future__ import annotations

import bisect


def lr_fraction(points: list[list[float]], position: float) -> float:
    xs = [float(p[0]) for p in points]
    i = bisect.bisect_right(xs, position)
    if i == 0:
        return float(points[0][1])
    if i == len(points):
        return float(points[-1][1])
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return float(y0) + (float(y1) - float(y0)) * (position - float(x0)) / (float(x1) - float(x0))


def step_to_position(step: int, unit: str, tokens_per_step: int) -> float:
    return float(step) if unit == "steps" else float(step) * tokens_per_step
