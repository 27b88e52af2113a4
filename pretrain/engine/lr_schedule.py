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


def warmup_beyond_end(points: list[list[float]], unit: str, tokens_per_step: int, last_step: int,
                      share: float = 0.01) -> str | None:
    """A warning when the run ends before its lr ever reaches `share` of the schedule's peak, e.g. the
    paper's token-based warmup (1.05e10 tokens) on a short run: it would train at an lr near 0 throughout."""
    end = step_to_position(last_step, unit, tokens_per_step)
    peak = max(float(p[1]) for p in points)
    reached = max([lr_fraction(points, end)] + [float(p[1]) for p in points if float(p[0]) <= end])
    if peak <= 0 or reached >= share * peak:
        return None
    first = crossing(points, share * peak)
    return (f"optim.schedule.points reach {share:.0%} of the peak lr at {first:.4g} {unit}, beyond this run's end "
            f"({end:.4g} {unit}, step {last_step}): the lr stays below {reached:.3g} x optim.lr. For a short run use "
            f"optim=wsd_short, or points in optim.schedule.unit=steps that fit the run")


def crossing(points: list[list[float]], target: float) -> float:
    """The first position where the schedule reaches `target` (it must reach it)."""
    if float(points[0][1]) >= target:
        return float(points[0][0])
    for (x0, y0), (x1, y1) in zip(points, points[1:]):  # noqa: B905
        if float(y1) >= target > float(y0):
            return float(x0) + (target - float(y0)) / (float(y1) - float(y0)) * (float(x1) - float(x0))
    raise ValueError(f"the schedule never reaches {target}")
