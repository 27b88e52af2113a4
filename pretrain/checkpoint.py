"""Checkpoints: DeepSpeed's engine state (sharded model, optimizer, lr schedule) plus, per rank, a
small JSON with what the engine does not know: step, tokens, the data stream's state and the
masking RNG. JSON, so reading it back needs no pickle.

A checkpoint is complete when DeepSpeed writes the `latest` file at the end of save_checkpoint, so
a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def ckpt_dir(run_dir: str) -> Path:
    return Path(run_dir) / "checkpoints"


def tag(step: int) -> str:
    return f"step{step:08d}"


def save(engine, run_dir: str, step: int, trainer_state: dict) -> None:
    directory = ckpt_dir(run_dir) / tag(step)
    directory.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank()
    (directory / f"trainer_state_rank{rank}.json").write_text(json.dumps(trainer_state))
    engine.save_checkpoint(str(ckpt_dir(run_dir)), tag=tag(step))


def latest(run_dir: str) -> str | None:
    marker = ckpt_dir(run_dir) / "latest"
    return marker.read_text().strip() if marker.is_file() else None


def load(engine, run_dir: str) -> dict | None:
    """Restores the newest complete checkpoint into `engine`; returns this rank's trainer state, or
    None when run_dir has no checkpoint."""
    name = latest(run_dir)
    if name is None:
        return None
    path, _ = engine.load_checkpoint(str(ckpt_dir(run_dir)), tag=name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir(run_dir) / name}")
    state_file = ckpt_dir(run_dir) / name / f"trainer_state_rank{torch.distributed.get_rank()}.json"
    if not state_file.is_file():
        raise RuntimeError(f"{state_file} is missing: the checkpoint was written by fewer ranks than this run has")
    return json.loads(state_file.read_text())


def rng_state(generator: torch.Generator) -> list[int]:
    return generator.get_state().tolist()


def set_rng_state(generator: torch.Generator, state: list[int]) -> None:
    generator.set_state(torch.tensor(state, dtype=torch.uint8))
