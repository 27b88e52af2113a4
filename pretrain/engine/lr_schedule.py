"""Piecewise-linear learning-rate schedules, positioned in steps, in tokens, or in fractions of the run.

A schedule is a list of [position, fraction of the peak lr] points, linear in between and held after
the last. Warmup-stable-decay is three or more points; the paper's drop from 4e-4 to 1e-4 at 1.2T
tokens is two points at the same position. unit=fraction places the points relative to the run's
length (its last step, from trainer.max_steps / max_tokens), like warmup_ratio in HF Trainer: the
same schedule then fits a run of any length.
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


UNITS = ("steps", "tokens", "fraction")


def step_to_position(step: int, unit: str, tokens_per_step: int, last_step: int = 1) -> float:
    if unit == "fraction":
        return float(step) / last_step
    return float(step) if unit == "steps" else float(step) * tokens_per_step


def warmup_beyond_end(points: list[list[float]], unit: str, tokens_per_step: int, last_step: int,
                      share: float = 0.01) -> str | None:
    """A warning when the run ends before its lr ever reaches `share` of the schedule's peak, e.g. the
    paper's token-based warmup (1.05e10 tokens) on a short run: it would train at an lr near 0 throughout."""
    end = step_to_position(last_step, unit, tokens_per_step, last_step)
    peak = max(float(p[1]) for p in points)
    reached = max([lr_fraction(points, end)] + [float(p[1]) for p in points if float(p[0]) <= end])
    if peak <= 0 or reached >= share * peak:
        return None
    first = crossing(points, share * peak)
    return (f"optim.schedule.points reach {share:.0%} of the peak lr at {first:.4g} {unit}, beyond this run's end "
            f"({end:.4g} {unit}, step {last_step}): the lr stays below {reached:.3g} x optim.lr. For a short run use "
            f"optim=wsd_short (points in fractions of the run), or points that fit the run")


def crossing(points: list[list[float]], target: float) -> float:
    """The first position where the schedule reaches `target` (it must reach it)."""
    if float(points[0][1]) >= target:
        return float(points[0][0])
    for (x0, y0), (x1, y1) in zip(points, points[1:]):  # noqa: B905
        if float(y1) >= target > float(y0):
            return float(x0) + (target - float(y0)) / (float(y1) - float(y0)) * (float(x1) - float(x0))
    raise ValueError(f"the schedule never reaches {target}")


def decay_beyond_end(points: list[list[float]], unit: str, tokens_per_step: int, last_step: int) -> str | None:
    """A warning when the run ends before its schedule starts to decay from the peak (e.g. a 200-step
    run on points in steps whose decay starts at step 200): it would end at the peak lr, which leaves
    the loss higher than the same run with its decay."""
    peak = max(float(p[1]) for p in points)
    last_peak = max(i for i, p in enumerate(points) if float(p[1]) == peak)
    if not any(float(p[1]) < peak for p in points[last_peak + 1:]):
        return None  # no decay in this schedule: nothing to miss
    start = float(points[last_peak][0])
    end = step_to_position(last_step, unit, tokens_per_step, last_step)
    if end > start:
        return None
    return (f"optim.schedule.points start their decay at {start:.4g} {unit}, at or beyond this run's end ({end:.4g} "
            f"{unit}, step {last_step}): the lr never decays. Use optim.schedule.unit=fraction (as optim=wsd_short "
            f"does) for points relative to the run's length, or points that fit the run")
