"""A trained model, from a run directory (its newest or a given checkpoint) or from an exported Hugging
Face folder: what evaluate, generate and export read, and what `model.init_from` copies into training.

A run directory is recognized by its config.yaml, an exported folder by its config.json. From a run,
the tokenizer and the EOS/MASK ids come from the run's shard directory (data.dir in config.yaml).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from data_pipeline.confined import UnsafeFileError, read_capped
from data_pipeline.shards import DataError, Manifest
from data_pipeline.tokenizer import load_tokenizer
from pretrain.checkpoint import choice
from pretrain.checkpoint import store as checkpoint
from pretrain.checkpoint.expert_files import open_checkpoint
from pretrain.config import ModelConfig
from pretrain.hf import lladamoe_format
from pretrain.hf.folder_check import check_model_folder, check_model_values, compare_shapes
from pretrain.hf.folder_files import weights_path
from pretrain.hf.format import FormatError, HFWeights, model_config, read_config
from pretrain.hf.moe_format import (
    LLaDA2Weights,
    OursNamed,
    check_llada2_matches,
    checkpoint_buffers,
    folder_buffers,
    is_llada2,
    model_config_from_llada2,
)
from pretrain.model.transformer import LLaDAModel

# Mask draws per choice when scoring multiple choice: the published default, in lm-eval and evaluate --choices.
CHOICE_MC_NUM = 128


def encode_pair(encode, eos_id: int, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """A (prompt, choice) pair as token ids, by lm-eval's convention, so that the lm-eval model and
    `pretrain.evaluate --choices` score the same tokens: trailing whitespace of the context goes to
    the continuation, whose tokens are those of the whole string after the context's (a token is never
    split between them). An empty context is EOS, as lm-eval's models take their prefix token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [eos_id], encode(continuation)
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


class SourceError(ValueError):
    """A path that is neither a usable run directory nor an exported folder."""


@dataclass
class Source:
    path: Path
    model: ModelConfig
    eos_id: int
    mask_id: int
    tokenizer_path: Path
    data_dir: Path | None  # a run's shard directory (its held-out split is the default eval set)
    checkpoint_dir: Path | None  # a run's checkpoint tag directory
    step: int | None
    lladamoe: bool = False  # a LLaDA-MoE folder (pretrain/hf/lladamoe_format.py)

    @property
    def is_run(self) -> bool:
        return self.checkpoint_dir is not None

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path, root=self.data_dir)  # a run's: confined to its data.dir

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one parameter at a time: fp32 from a checkpoint, the stored dtype from a folder."""
        if self.is_run:
            yield from open_checkpoint(self.checkpoint_dir).tensors()
        elif self.lladamoe:
            from pretrain.hf.causal_import import CausalWeights

            weights = CausalWeights.open(self.path, self.model)  # Qwen3-MoE's names, the experts stacked
            yield from ((name, weights.get(name)) for name in [*weights.ours, *weights.stacked])
        elif self.model.moe is not None:  # LLaDA 2.0's MoE format (pretrain/hf/moe_format.py)
            yield from ((n, t) for n, t in LLaDA2Weights(self.path, self.model).tensors()
                        if not n.endswith("expert_bias"))
        else:
            yield from HFWeights.open(self.path).tensors()

    def shapes(self) -> dict[str, torch.Size]:
        if self.is_run:
            return open_checkpoint(self.checkpoint_dir).shapes
        if self.model.moe is not None:
            return {n: t.shape for n, t in self.tensors()}
        return HFWeights.open(self.path).shapes()

    def buffers(self) -> dict[str, torch.Tensor]:
        """The model's buffers that are state (model.moe's expert biases), fp32; none for a dense model."""
        if self.model.moe is None:
            return {}
        if self.lladamoe:
            return lladamoe_format.folder_buffers(self.model)
        return checkpoint_buffers(self.checkpoint_dir) if self.is_run else folder_buffers(self.path, self.model)


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: p.shape for name, p in LLaDAModel(cfg).named_parameters()}


def check_shapes(found: dict[str, torch.Size], cfg: ModelConfig, where: str) -> None:
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in found:
            raise SourceError(f"{where}: no parameter {name}")
        if tuple(found[name]) != tuple(shape):
            raise SourceError(f"{where}: {name} has shape {list(found[name])}, model config gives {list(shape)}")
    extra = [n for n in found if n not in expected]
    if extra:
        raise SourceError(f"{where}: {extra[0]} is not a parameter of the model")


RUN_CONFIG_MAX_BYTES = 4 << 20  # a run's config.yaml is a few KB


def read_run_config(run_dir: Path):
    """The run's config.yaml, read as data/confined.py reads what data names: inside the run directory,
    a regular file, at most RUN_CONFIG_MAX_BYTES, and none of its content echoed in an error."""
    try:
        text = read_capped(run_dir, "config.yaml", RUN_CONFIG_MAX_BYTES).decode("utf-8")
        cfg = OmegaConf.create(text)
    except (UnsafeFileError, FileNotFoundError) as e:
        raise SourceError(str(e)) from None
    except Exception:  # YAML errors quote the text: never echoed
        cfg = None
    if not isinstance(cfg, DictConfig) or not isinstance(cfg.get("model"), DictConfig):
        raise SourceError(f"{run_dir / 'config.yaml'}: not a run's config (a YAML mapping with a model section)")
    return cfg


def _run_source(run_dir: Path, step: int | None) -> Source:
    cfg = read_run_config(run_dir)
    model = model_config(OmegaConf.to_container(cfg.model, resolve=True))
    check_model_values(model, f"{run_dir}/config.yaml")
    try:
        chosen = choice.choose(run_dir, step)  # the verified choice every command makes
    except checkpoint.CheckpointError as e:
        raise SourceError(str(e)) from None
    compare_shapes(open_checkpoint(chosen.directory).shapes, model, f"{run_dir}/config.yaml")
    data_dir = Path(cfg.data.dir)
    try:
        manifest = Manifest.load(data_dir)
    except DataError as e:
        raise SourceError(f"{run_dir}: the run's data.dir={data_dir} (tokenizer and special ids) is unreadable: "
                          f"{e}") from None
    return Source(run_dir, model, manifest.eos_id, manifest.mask_id, data_dir / "tokenizer.json", data_dir,
                  chosen.directory, int(chosen.manifest["step"]))


def _lladamoe_model(config: dict, folder: Path) -> ModelConfig:
    """A LLaDA-MoE folder's ModelConfig, its values checked and its weights' names and shapes compared
    (headers only)."""
    from pretrain.hf.causal_import import CausalWeights

    model = model_config({**lladamoe_format.source_fields(config, str(folder)), "name": folder.name,
                          "attention": "auto", "mask_token": None})
    check_model_values(model, f"{folder}/config.json")
    CausalWeights.open(folder, model).check_names(expected_shapes(model))
    return model


def _folder_source(folder: Path) -> Source:
    config = read_config(folder)
    if lladamoe_format.is_lladamoe(config):  # LLaDA-MoE: values, then names and shapes from the headers
        if "eos_token_id" not in config:
            raise FormatError(f"{folder}/config.json has no 'eos_token_id'")
        tokenizer = weights_path(folder, "tokenizer.json", "a model folder holds its tokenizer")
        return Source(folder, _lladamoe_model(config, folder), config["eos_token_id"],
                      lladamoe_format.mask_id(config, folder), tokenizer, None, None, None, lladamoe=True)
    if is_llada2(config):  # LLaDA 2.0's MoE format: its reader checks names and shapes as it loads
        model = model_config_from_llada2(config, str(folder))
        check_model_values(model, f"{folder}/config.json")
    else:
        config, model = check_model_folder(folder)  # values and weight headers, before anything is built
    for key in ("eos_token_id", "mask_token_id"):
        if key not in config:
            raise FormatError(f"{folder}/config.json has no {key!r}")
    tokenizer = weights_path(folder, "tokenizer.json", "a model folder holds its tokenizer")
    return Source(folder, model, config["eos_token_id"], config["mask_token_id"], tokenizer,
                  None, None, None)


def open_source(path: str | Path, step: int | None = None) -> Source:
    path = Path(path)
    if (path / "config.json").is_file():
        if step is not None:
            raise SourceError(f"--step {step}: {path} is an exported folder, it has one set of weights")
        return _folder_source(path)
    if (path / "config.yaml").exists() or (path / "config.yaml").is_symlink():  # read_run_config checks what it is
        return _run_source(path, step)
    raise SourceError(f"{path} is neither a run directory (config.yaml, checkpoints/) nor an exported "
                      f"Hugging Face folder (config.json)")


def load_model(source: Source, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LLaDAModel:
    """The whole model on one device, weights cast to `dtype` (each tensor once: no second copy)."""
    with torch.device("meta"):
        model = LLaDAModel(source.model)
    state = {}
    for name, tensor in source.tensors():
        state[name] = tensor.to(device=device, dtype=dtype)
    check_shapes({n: t.shape for n, t in state.items()}, source.model, str(source.path))
    state.update({n: b.to(device) for n, b in source.buffers().items()})  # fp32 whatever `dtype`
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = ["transformer.ff_out.weight"] if source.model.tie_embeddings else []
    if missing != tied or unexpected:
        raise SourceError(f"{source.path}: missing {missing}, unexpected {unexpected}")
    if source.model.tie_embeddings:  # assign=True replaced the shared parameter: tie the head again
        model.transformer.ff_out.weight = model.transformer.wte.weight
    return model.eval()


# -- model.init_from: an exported folder into a (possibly ZeRO-3 partitioned) model -------------------
def check_init_from(folder: str, expected: ModelConfig, data_tokenizer: str | None = None) -> dict:
    """The folder's config.json against the run's model= config; returns the config (cheap, before any work).
    An autoregressive source (pretrain/hf/causal_import.py) also fills model.mask_token and model.vocab_size."""
    from pretrain.hf.causal_import import check_source, is_llada
    from pretrain.hf.format import check_matches

    config = read_config(folder)
    if is_llada2(config):  # LLaDA 2.0's MoE format: the same shapes and routing as model=
        check_llada2_matches(model_config_from_llada2(config, folder), expected, folder)
        return config
    if not is_llada(config):
        check_source(folder, expected, data_tokenizer)
        return config
    check_matches(check_model_folder(folder)[1], expected, folder)
    return config


def copy_weights_into(model: torch.nn.Module, folder: str) -> None:
    """Copies an exported folder's tensors into `model`, one parameter at a time. Under ZeRO-3 each
    parameter is gathered, rank 0 fills it from the file, and DeepSpeed re-partitions it from rank 0's
    values; so no rank ever holds more than one whole parameter beyond its own shard."""
    import deepspeed
    import torch.distributed as dist

    from pretrain.hf.causal_import import CausalWeights, is_llada

    cfg = model.cfg
    writer = not dist.is_initialized() or dist.get_rank() == 0
    if is_llada2(read_config(folder)):  # every rank sets the expert biases (buffers: not partitioned)
        weights = OursNamed(dict(LLaDA2Weights(folder, cfg).tensors()) if writer else {})
        with torch.no_grad():
            for name, b in folder_buffers(folder, cfg).items():
                model.get_buffer(name).copy_(b)
    else:
        weights = HFWeights.open(folder) if is_llada(read_config(folder)) else CausalWeights.open(folder, cfg)
        shapes = {n: getattr(p, "ds_shape", p.shape) for n, p in model.named_parameters()}
        weights.check_names(shapes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if hasattr(p, "ds_id"):  # partitioned by ZeRO-3
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if writer:
                        p.data.copy_(weights.get(name))
            else:
                p.data.copy_(weights.get(name))
