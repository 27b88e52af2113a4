"""`model.init_from=FOLDER` alone, as `from_pretrained` does it: the architecture from the folder.

Without `model=` on the command line (Hydra's override list tells it from the default), the model
section's architecture keys are set from FOLDER/config.json: a LLaDA export (pretrain.export), a
Llama / Qwen2 / Qwen3 (-MoE) causal LM or a LLaDA-MoE folder (pretrain/hf/causal_import.py). A
`model.KEY=...` given on the command line or set by an `experiment=` preset still wins, and is then checked
against the folder like any other value (`+model.moe.KEY=...` too: the folder fills the other model.moe
keys). An explicit `model=` keeps its preset: one that disagrees with the folder is refused by the
start-up checks, as before. Only config.json is read here (no weights); the folder's other checks come
after, with the rest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, open_dict

from pretrain.hf.causal_import import MATCHED, is_llada, source_fields
from pretrain.hf.format import model_config_from_hf, read_config

# The keys a folder decides; everything else (init_std, attention, document_mask, ...) stays the run's.
ARCHITECTURE = (*MATCHED, "vocab_size", "max_sequence_length")


def named_on_command_line(overrides: list[str]) -> set[str]:
    """The keys of `key=value` overrides, without Hydra's +, ++ and ~ prefixes."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def set_by_preset(overrides: list[str]) -> set[str]:
    """The model keys an `experiment=NAME` preset sets (conf/experiment/NAME.yaml), as `model.KEY`, and
    `model` itself where it picks a model group: a preset's value wins over the folder's as a command
    line's does (experiment=extend_context sets the new RoPE and length an export is continued at)."""
    from omegaconf import OmegaConf

    from data_pipeline.config import CONF_DIR

    names = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "experiment"]
    keys = set()
    for name in names:
        path = CONF_DIR / "experiment" / f"{name}.yaml"
        if not path.is_file():
            continue  # Hydra has already refused an unknown preset
        preset = OmegaConf.to_container(OmegaConf.load(path))
        keys |= {f"model.{k}" for k in (preset.get("model") or {})}
        if any(isinstance(d, dict) and "override /model" in d for d in preset.get("defaults") or []):
            keys.add("model")
    return keys


def model_from_folder(cfg: DictConfig, overrides: list[str]) -> bool:
    """Sets cfg.model's architecture from model.init_from's config.json when `model=` is not among the
    overrides; returns whether it did. Raises FormatError for a folder it cannot read."""
    folder = cfg.model.get("init_from")
    given = named_on_command_line(overrides) | set_by_preset(overrides)
    if not folder or "model" in given:
        return False
    config = read_config(folder)
    if is_llada(config):
        fields = dataclasses.asdict(model_config_from_hf(config, folder))
    else:  # the vocabulary is the source's rows plus a mask token's, resolved by the start-up checks
        fields = {**source_fields(config, folder), "vocab_size": None}
    keys = (*ARCHITECTURE, "shift_prediction") if is_llada(config) else ARCHITECTURE  # an export's own reading
    with open_dict(cfg.model):
        for key in keys:
            if f"model.{key}" in given:
                continue
            value, inner = fields[key], {k.split(".", 2)[2] for k in given if k.startswith(f"model.{key}.")}
            if inner and isinstance(value, dict) and cfg.model.get(key) is not None:
                # +model.moe.top_k=1 with a mixture-of-experts folder: the command line's value stays, to be
                # checked against the folder's like any other (pretrain/hf/causal_import.check_source)
                value = {**value, **{k: cfg.model[key][k] for k in inner if k in cfg.model[key]}}
            cfg.model[key] = value
        cfg.model.name = Path(folder).name
    return True
