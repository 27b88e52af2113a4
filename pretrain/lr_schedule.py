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


def warmup_beyond_end(points: list[list[float]], unit: str, tokens_per_step: int, last_step: int) -> str | None:
    """A warning when the schedule's first point with a nonzero lr lies beyond the run's last step: the
    run would train at (nearly) zero lr throughout, e.g. the paper's token-based schedule on a short run."""
    first_nonzero = next((float(p[0]) for p in points if float(p[1]) > 0), None)
    end = step_to_position(last_step, unit, tokens_per_step)
    if first_nonzero is None or first_nonzero > end:
        reached = lr_fraction(points, end)
        where = "never" if first_nonzero is None else f"at {first_nonzero:.4g} {unit}"
        return (f"optim.schedule.points reach a nonzero lr {where}, beyond this run's end ({end:.4g} {unit}, "
                f"step {last_step}): the lr ends at {reached:.3g} x optim.lr. For a short run use optim=wsd_short "
                f"or set optim.schedule.unit=steps with points that fit")
    return None
