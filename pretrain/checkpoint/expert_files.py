"""Whole parameters, under our model's names, out of a checkpoint written under expert parallelism
(cluster.expert_parallel: DeepSpeed's AutoEP layers).

AutoEP keeps on each rank only its experts, sharded by ZeRO-3 over the ranks holding the same ones, so
zero_files.py's whole-world reassembly does not apply (DeepSpeed's zero_to_fp32 refuses these files too).
DeepSpeed's ds_to_universal is expert-aware: it writes every parameter whole, the experts in their
logical [num_experts, ...] shape. Such a checkpoint is read from that form, converted once into the
run's checkpoints/universal/<tag> (the folder a resume at another size uses) and reused after.

AutoEP's layers are named after its own modules; they are mapped back to ours (pretrain/model/moe.py)
here, so the export, evaluation and sampling see the model they would see without expert parallelism.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch

from pretrain.checkpoint import ds_names, zero_files
from pretrain.checkpoint.files import CheckpointError, read_manifest
from pretrain.checkpoint.store import config_hash
from pretrain.checkpoint.universal import convert_once

# AutoEP's names (deepspeed/module_inject/auto_ep_layer.py) -> ours, within transformer.blocks.{i}.moe.
OUR_NAMES = (
    (r"\.moe\.router\.gate\.weight$", ".moe.router.weight"),
    (r"\.moe\.router\.e_score_correction_bias$", ".moe.router.expert_bias"),
    (r"\.moe\.experts\.w1$", ".moe.experts.gate_proj"),
    (r"\.moe\.experts\.w3$", ".moe.experts.up_proj"),
    (r"\.moe\.experts\.w2$", ".moe.experts.down_proj"),
    (r"\.moe\.shared_experts\.", ".moe.shared."),
)


def our_name(name: str) -> str:
    for pattern, ours in OUR_NAMES:
        name = re.sub(pattern, ours, name)
    return name


def open_checkpoint(directory: str | Path) -> zero_files.ZeroCheckpoint | ExpertCheckpoint:
    """Any run's checkpoint tag directory as whole parameters under our names (zero_files.py's reader, or
    the universal form's for an expert-parallel one)."""
    directory = Path(directory)
    files = ds_names.model_files(directory)
    if files:
        states = zero_files.load_engine_file(files[0])
        if states.get("ds_autoep_layers"):  # written by an engine with AutoEP layers
            return ExpertCheckpoint(directory, states)
    return zero_files.open_checkpoint(directory)


class ExpertCheckpoint:
    """zero_files.ZeroCheckpoint's interface (shapes, tensors) over DeepSpeed's universal form."""

    def __init__(self, directory: Path, states: dict):
        self.directory = directory
        source = config_hash(read_manifest(directory)["files"])  # a replaced checkpoint converts again
        self.root = convert_once(directory, directory.parent / "universal", directory.name, source) / "zero"
        groups = states["param_shapes"]
        local = {n: s for g in (groups if isinstance(groups, list) else [groups]) for n, s in g.items()}
        experts = {layer["module_path"]: layer["num_experts"] for layer in states["ds_autoep_layers"]}
        # A rank's experts are [num_experts / EP, ...]; the universal form holds them all, [num_experts, ...].
        self.shapes_by_name = {n: torch.Size([experts[n.rsplit(".experts.", 1)[0]], *s[1:]])
                               if re.search(r"\.moe\.experts\.w[123]$", n) else torch.Size(s) for n, s in local.items()}

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {our_name(n): s for n, s in self.shapes_by_name.items()}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in self.shapes_by_name.items():
            path = self.root / name / "fp32.pt"
            if not path.is_file():
                raise CheckpointError(f"{self.directory}: the universal form lacks {name} ({path})")
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            # an expert parameter is {"param": [E, ...], "is_expert_param": True, ...}; any other a flat tensor
            tensor = saved["param"] if isinstance(saved, dict) else saved
            yield our_name(name), tensor.float().reshape(shape).clone()


def buffers(states: dict) -> dict[str, torch.Tensor]:
    """The module's saved buffers under our names (AutoEP's e_score_correction_bias is our expert_bias)."""
    return {our_name(k): v for k, v in (states.get("module") or {}).items()}
