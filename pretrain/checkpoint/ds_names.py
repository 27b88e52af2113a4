"""DeepSpeed's checkpoint file names, in one place.

DeepSpeed names a tag directory's files by precision, stage and rank:
  ZeRO-3 model states   zero_pp_rank_{R}_mp_rank_{MP:02d}_model_states.pt
  stages 0-2 model      mp_rank_{MP:02d}_model_states.pt
  optimizer states      {PREFIX}zero_pp_rank_{R}_mp_rank_{MP:02d}_optim_states.pt
where PREFIX is "" for fp32 and fp16 runs and "bf16_" for bf16 runs (fp16_ accepted too). Every reader
finds files here, by pattern, never by the position of a word in the name: a bf16 run once broke
export, evaluate and generate that way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_NAME = re.compile(r"^(?P<prefix>(?:bf16|fp16)_)?(?:zero_pp_rank_(?P<rank>\d+)_)?mp_rank_(?P<mp>\d+)_"
                   r"(?P<kind>model|optim)_states\.pt$")


@dataclass(frozen=True)
class EngineFileName:
    kind: str  # "model" or "optim"
    rank: int | None  # data-parallel rank; None for a stage 0-2 model file (one for all ranks)
    mp_rank: int
    prefix: str  # "", "bf16_" or "fp16_"


def parse(name: str) -> EngineFileName | None:
    """What a DeepSpeed checkpoint file name says, or None for any other file."""
    m = _NAME.match(name)
    if m is None or (m["kind"] == "optim" and m["rank"] is None):
        return None
    rank = int(m["rank"]) if m["rank"] is not None else None
    return EngineFileName(m["kind"], rank, int(m["mp"]), m["prefix"] or "")


def _files(directory: Path, kind: str) -> list[Path]:
    found = []
    for path in Path(directory).glob(f"*_{kind}_states.pt"):
        if (name := parse(path.name)) is not None and name.kind == kind:
            found.append((name.rank if name.rank is not None else -1, name.mp_rank, path))
    return [path for *_, path in sorted(found)]


def model_files(directory: str | Path) -> list[Path]:
    """The model-state files of a tag directory, in rank order."""
    return _files(Path(directory), "model")


def optim_files(directory: str | Path) -> list[Path]:
    """The optimizer-state files of a tag directory (any precision), in rank order (10 after 9)."""
    return _files(Path(directory), "optim")


def has_model_states(directory: str | Path) -> bool:
    return bool(model_files(directory))


def rank_of(name: str) -> int | None:
    """The data-parallel rank in a DeepSpeed file name; None if the name has none."""
    parsed = parse(name)
    return parsed.rank if parsed is not None else None
