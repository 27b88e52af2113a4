"""A table at the end of a Hydra sweep (`python -m pretrain.train -m ...`): each job's run_dir, status,
last step, final training loss and final held-out loss, read from its metrics.jsonl.

Hydra calls this callback (conf/config.yaml: hydra.callbacks.sweep_table) after each job and once after
the last; only rank 0 prints, in the process that ran the jobs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def final_values(run_dir: Path) -> dict:
    """The last step, training loss and held-out loss in run_dir/metrics.jsonl (None where absent)."""
    out: dict[str, Any] = {"step": None, "loss": None, "eval_loss": None}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("loss") is not None:
            out.update(step=r.get("step"), loss=r["loss"])
        if r.get("eval/loss") is not None:
            out["eval_loss"] = r["eval/loss"]
    return out


def number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def table(jobs: list[tuple[str, str]]) -> str:
    """jobs: (run_dir, status) -> one line each, aligned."""
    rows = [("run_dir", "status", "step", "loss", "eval/loss")]
    for run_dir, status in jobs:
        v = final_values(Path(run_dir))
        rows.append((run_dir, status, "-" if v["step"] is None else str(v["step"]), number(v["loss"]),
                     number(v["eval_loss"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    return "\n".join(line.rstrip() for line in lines)


class SweepTable(Callback):
    def __init__(self) -> None:
        self.jobs: list[tuple[str, str]] = []

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        try:
            run_dir = str(job_return.cfg.run_dir)
        except Exception:  # a config that never resolved: nothing to read back
            return
        self.jobs.append((run_dir, job_return.status.name.lower()))

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if self.jobs and os.environ.get("RANK", "0") == "0":
            print(f"sweep: {len(self.jobs)} jobs\n{table(self.jobs)}", flush=True)
