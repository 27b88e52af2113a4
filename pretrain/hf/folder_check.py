"""The checks every command runs on a model before building it: an exported folder (generate,
evaluate, export of a folder, lm_eval, model.init_from) or a run's model section.

1. config.json's values go through the same domain table as training's config (pretrain/domains.py)
   and the model's own relations (pretrain/model/transformer.check_config): a head count of 0 or a
   negative norm epsilon is one line, not a traceback or a NaN.
2. The sizes it gives are compared with the weights' names and shapes, read from the safetensors
   headers alone (pretrain/hf/folder_files.py), before any model is built: a config.json saying
   n_layers=100000 beside 4 blocks of weights fails at once instead of building for minutes.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import ConfigError, ModelConfig
from pretrain.domains import check_section
from pretrain.hf.folder_files import FormatError, header_shapes, weight_map
from pretrain.model.transformer import HF_PREFIX, LLaDAModel, check_config

_BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.")


def check_model_values(model: ModelConfig, where: str) -> None:
    """The model's values against their domains and relations, as a one-line FormatError naming `where`."""
    try:
        check_section(model, "model")
        check_config(model, model.max_sequence_length, "none")
    except ConfigError as e:
        raise FormatError(f"{where}: {e}") from None


def expected_shapes(model: ModelConfig) -> dict[str, torch.Size]:
    """Parameter name -> shape of the model `model` describes, without building more blocks than differ
    (on the meta device): the first dense layers of a mixture of experts, then one block whose copies
    the others are."""
    built = min(model.n_layers, (model.moe.first_dense_layers if model.moe else 0) + 1)
    with torch.device("meta"):
        params = LLaDAModel(dataclasses.replace(model, n_layers=built)).named_parameters()
        one = {n: p.shape for n, p in params}
    shapes = {}
    for name, shape in one.items():
        if m := _BLOCK.match(name):
            i, rest = int(m.group(1)), name[m.end():]
            copies = range(i, model.n_layers) if i == built - 1 else [i]
            shapes.update({f"transformer.blocks.{j}.{rest}": shape for j in copies})
        else:
            shapes[name] = shape
    return shapes


def compare_shapes(found: dict[str, list[int] | torch.Size], model: ModelConfig, where: str) -> None:
    """The weights' names and shapes (ours, without "model.") against the model's; one line for the first
    difference. The block count is compared first, so an absurd n_layers costs nothing."""
    blocks = {int(m.group(1)) for name in found if (m := _BLOCK.match(name))}
    if len(blocks) != model.n_layers:
        raise FormatError(f"{where}: n_layers={model.n_layers}, but the weights hold {len(blocks)} blocks")
    expected = expected_shapes(model)
    for name, shape in expected.items():
        if name not in found:
            raise FormatError(f"{where}: the weights have no {HF_PREFIX + name}, which the config needs")
        if list(found[name]) != list(shape):
            raise FormatError(f"{where}: {HF_PREFIX + name} has shape {list(found[name])}, the config gives "
                              f"{list(shape)}")
    extra = sorted(n for n in found if n not in expected)
    if extra:
        raise FormatError(f"{where}: the weights hold {HF_PREFIX + extra[0]}, which the config has no place for")


def check_model_folder(folder: str | Path) -> tuple[dict, ModelConfig]:
    """An exported LLaDA folder's config.json (values and relations) and its weights' headers, before any
    model is built. Returns (config.json, its ModelConfig)."""
    from pretrain.hf.format import model_config_from_hf, read_config

    where = f"{folder}/config.json"
    config = read_config(folder)
    try:
        model = model_config_from_hf(config, str(folder))
    except (OmegaConfBaseException, TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{where}: a value of the wrong type ({str(e).splitlines()[0]})") from None
    check_model_values(model, where)
    shapes = header_shapes(folder, weight_map(folder))
    ours = {}
    for name, shape in shapes.items():
        if not name.startswith(HF_PREFIX):
            raise FormatError(f"{folder}: tensor {name[:80]!r} lacks the published {HF_PREFIX!r} prefix")
        ours[name[len(HF_PREFIX):]] = shape
    compare_shapes(ours, model, where)
    return config, model
