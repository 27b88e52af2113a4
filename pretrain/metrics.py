"""Run metrics: one JSON object per logged step in run_dir/metrics.jsonl, mirrored to W&B.

Only rank 0 writes; the values it writes are already averaged over ranks by the loop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: str, logging_cfg, config: dict, enabled: bool, start_step: int = 0):
        """start_step: the step training (re)starts from; records past it, logged by an interrupted
        run after its last checkpoint, are dropped so each step appears once."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if logging_cfg.mode == "disabled":
            return
        import wandb  # only rank 0 pays for the import

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb_run = wandb.init(mode=logging_cfg.mode, project=logging_cfg.project, entity=logging_cfg.entity,
                                    name=logging_cfg.name or Path(run_dir).name, dir=run_dir, config=config,
                                    resume="allow")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
