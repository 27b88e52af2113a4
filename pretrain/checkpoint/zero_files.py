"""Whole parameters out of a DeepSpeed checkpoint, one at a time, on the CPU.

A ZeRO-3 checkpoint keeps the fp32 master weights in the optimizer files, one per rank
(`[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`, names in ds_names.py): per parameter group a flat
vector holding, parameter after parameter in the order of `param_shapes` (in the model-state files), rank R's slice of
ceil(numel / world) elements (the last rank's slice zero-padded). A parameter is whole again by
concatenating its slice from every rank and dropping the padding.

Memory: every file is opened with `torch.load(mmap=True)`, so the optimizer moments and the flat
vectors stay on disk, mapped; only the parameter being assembled is copied into RAM. The page cache
holds what was read, but the kernel drops it under pressure. So a caller that writes each parameter
away before asking for the next never holds the model even once (see pretrain/export.py).

Stages 0-2 keep the whole model in the model-state file's `module`; it is read from there.

The files are DeepSpeed's own engine state; they are still read with `weights_only=True`, with the two
DeepSpeed classes the optimizer file names allowed explicitly.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.checkpoint import ds_names


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or does not add up."""


@contextmanager
def _deepspeed_globals():
    # DeepSpeed logs its accelerator choice to stdout when first imported (its handler keeps the stream
    # it found): send that to stderr, the export/evaluate/generate commands print JSON on stdout.
    with redirect_stdout(sys.stderr):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
        yield


def load_engine_file(path: Path) -> dict:
    """One of DeepSpeed's checkpoint files, without unpickling anything but tensors and two DeepSpeed enums."""
    with _deepspeed_globals():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


@dataclass
class ZeroCheckpoint:
    directory: Path
    stage: int
    world_size: int
    param_shapes: list[dict[str, torch.Size]]  # per parameter group, in flat-vector order
    _module: dict | None  # stages 0-2: the whole model
    _flat_groups: list[list[torch.Tensor]] | None  # stage 3: [rank][group] mmapped fp32 vectors

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {name: shape for group in self.param_shapes for name, shape in group.items()}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole fp32 tensor), one parameter at a time, in checkpoint order."""
        if self._module is not None:
            for name in self.shapes:
                yield name, self._module[name].float()
            return
        for g, group in enumerate(self.param_shapes):
            offset = 0
            for name, shape in group.items():
                part = math.ceil(shape.numel() / self.world_size)
                pieces = [self._flat_groups[r][g][offset: offset + part] for r in range(self.world_size)]
                yield name, torch.cat(pieces)[: shape.numel()].view(shape)  # cat copies out of the mapped files
                offset += part
            available = self._flat_groups[0][g].numel()
            if offset != available:
                raise CheckpointError(f"{self.directory}: parameter group {g} holds {available} elements per rank, "
                                      f"its parameters need {offset}")


def open_checkpoint(directory: str | Path) -> ZeroCheckpoint:
    """Reads the layout of a DeepSpeed checkpoint tag directory (the tensors stay mapped on disk)."""
    directory = Path(directory)
    model_files = ds_names.model_files(directory)
    if not model_files:
        raise CheckpointError(f"{directory}: no *_model_states.pt (not a DeepSpeed checkpoint directory)")
    states = load_engine_file(model_files[0])
    if states.get("ds_autoep_layers"):  # AutoEP's layers: pretrain/checkpoint/expert_files.py reads them
        raise CheckpointError(f"{directory}: written under expert parallelism (cluster.expert_parallel); "
                              f"read it with pretrain.checkpoint.expert_files.open_checkpoint")
    param_shapes = states["param_shapes"]
    if isinstance(param_shapes, dict):
        param_shapes = [param_shapes]
    optim_files = ds_names.optim_files(directory)
    stage = 0
    if optim_files:
        first = load_engine_file(optim_files[0])["optimizer_state_dict"]
        stage = int(first.get("zero_stage", 0))
    if stage != 3:
        module = states["module"]
        missing = [n for g in param_shapes for n in g if n not in module or module[n].numel() != g[n].numel()]
        if missing:
            raise CheckpointError(f"{directory}: {model_files[0].name} lacks the whole tensor of {missing[0]}")
        return ZeroCheckpoint(directory, stage, 1, param_shapes, module, None)
    world = first["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if len(optim_files) != world:
        raise CheckpointError(f"{directory}: {len(optim_files)} *_optim_states.pt files, but the checkpoint was "
                              f"written by {world} ranks")
    flat = [load_engine_file(f)["optimizer_state_dict"]["fp32_flat_groups"] for f in optim_files]
    if any(len(groups) != len(param_shapes) for groups in flat):
        raise CheckpointError(f"{directory}: {len(param_shapes)} parameter groups in the model states, "
                              f"{len(flat[0])} in the optimizer states")
    return ZeroCheckpoint(directory, stage, world, param_shapes, None, flat)


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The whole model as an fp32 state dict (for evaluation and sampling, which need it all anyway)."""
    return dict(open_checkpoint(directory).tensors())


def optimizer_tensors(directory: str | Path) -> list[torch.Tensor]:
    """Every rank's fp32 master weights and Adam moments, in rank order: what two checkpoints must share
    to count as the same training state (the fault drills and tests compare them)."""
    tensors = []
    for path in ds_names.optim_files(directory):
        state = load_engine_file(path)["optimizer_state_dict"]
        tensors += list(state["fp32_flat_groups"])
        for s in state["optimizer_state_dict"]["state"].values():
            tensors += [s["exp_avg"], s["exp_avg_sq"]]
    return tensors
