"""LLaDA's published Hugging Face format (GSAI-ML/LLaDA-8B-Base): config.json, safetensors weights
(sharded, with model.safetensors.index.json, above a size limit), tokenizer files. Writing and reading.

The published modeling code (`trust_remote_code`, `LLaDAModelLM`) builds its model from config.json and
falls back to OLMo's defaults for any key that is missing - with no error: no `rope_theta` means
10000, no `layer_norm_type` means LayerNorm, no `weight_tying` means a tied head, no `include_bias`
means biases. So the export writes every key the published config has, and the import refuses a
config.json that lacks one of the keys that decide the architecture, or that sets one to another value.

A model warm-started from an autoregressive one (pretrain/hf/causal_import.py) may differ from LLaDA's
architecture; the export then says how, in keys that are absent from a LLaDA export (absent = LLaDA's;
the shipped modeling code reads them): `include_qkv_bias` and `weight_tying` (published keys) set to
true, `qk_norm: "per_head_rms"` (RMSNorm per head on q and k, before RoPE, weights q_norm / k_norm of
[head_dim], eps rms_norm_eps), `head_dim` (when not d_model / n_heads), `rope_scaling` (transformers'
Llama 3 dict), `shift_prediction: true` (logits = cat([raw[:, :1], raw[:, :-1]], dim=1)), and
`mask_token_origin` (tokenizer | reserved | added) next to mask_token_id.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from data_pipeline.config import CONF_DIR
from pretrain.config import ModelConfig
from pretrain.hf.folder_files import (  # noqa: F401  FormatError: its home is folder_files, its users import it here
    CONFIG_MAX_BYTES,
    INDEX,
    WEIGHTS,
    FormatError,
    read_json,
    weight_map,
    weights_path,
)
from pretrain.model.transformer import HF_PREFIX

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TORCH_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}  # config.json's "precision": the weights' dtype
PUBLISHED_CODE_REPO = "GSAI-ML/LLaDA-8B-Base"

# The keys of the published config.json that fix the architecture to the one pretrain/model/transformer.py builds.
# Each value is the only one our model implements.
ARCHITECTURE = {
    "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "rope": True,
    "include_bias": False, "include_qkv_bias": False, "bias_for_layer_norm": False, "weight_tying": False,
    "alibi": False, "attention_layer_norm": False, "input_emb_norm": False, "scale_logits": False,
    "layer_norm_with_affine": True, "block_group_size": 1, "multi_query_attention": None,
    "rope_full_precision": True,
}
# Published keys that a warm-started model may set otherwise: config.json key -> ModelConfig field.
WARM_START_FIELDS = {"include_qkv_bias": "qkv_bias", "weight_tying": "tie_embeddings"}
# The keys that size the model: config.json key -> ModelConfig field.
SIZES = {"n_layers": "n_layers", "d_model": "d_model", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
         "mlp_hidden_size": "mlp_hidden_size", "embedding_size": "vocab_size", "vocab_size": "vocab_size",
         "max_sequence_length": "max_sequence_length", "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps"}
# Every key of the published config.json (GSAI-ML/LLaDA-8B-Base), the test checks the export against it.
PUBLISHED_KEYS = sorted({
    *ARCHITECTURE, *SIZES, "alibi_bias_max", "architectures", "attention_dropout",
    "attention_layer_norm_with_affine", "auto_map", "embedding_dropout", "eos_token_id", "flash_attention",
    "init_cutoff_factor", "init_device", "init_fn", "init_std", "mask_token_id", "mlp_ratio", "model_type",
    "pad_token_id", "precision", "residual_dropout", "use_cache", "transformers_version", "torch_dtype",
})


def auto_map(code_repo: str | None) -> dict[str, str]:
    """The published auto_map. Without `code_repo` it names the modeling files every export carries
    (pretrain/hf/modeling/), so the folder loads offline; with `code_repo` the classes are fetched from
    that Hub repository instead (transformers' "repo--module.Class" form)."""
    prefix = f"{code_repo}--" if code_repo else ""
    return {"AutoConfig": f"{prefix}configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": f"{prefix}modeling_llada.LLaDAModelLM",
            "AutoModel": f"{prefix}modeling_llada.LLaDAModelLM"}


def hf_config(m: ModelConfig, eos_id: int, mask_id: int, dtype: torch.dtype, code_repo: str | None) -> dict:
    sizes = {key: getattr(m, field) for key, field in SIZES.items()}
    config = {
        **ARCHITECTURE, **sizes,
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "auto_map": auto_map(code_repo),
        "eos_token_id": eos_id, "pad_token_id": eos_id, "mask_token_id": mask_id,
        "mlp_ratio": round(m.mlp_hidden_size / m.d_model, 4), "init_std": m.init_std,
        "alibi_bias_max": 8.0, "attention_dropout": 0.0, "attention_layer_norm_with_affine": True,
        "embedding_dropout": 0.0, "residual_dropout": 0.0, "flash_attention": False, "init_cutoff_factor": None,
        "init_device": "meta", "init_fn": "mitchell", "precision": PRECISION_NAMES[dtype], "use_cache": False,
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],
    }
    version = installed_transformers()
    if version:  # the published file names the version that wrote it; we write none rather than a false one
        config["transformers_version"] = version
    config.update(warm_start_keys(m))
    return dict(sorted(config.items()))


def installed_transformers() -> str | None:
    """The installed transformers' version, read from its metadata (no import: the export does not need it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def warm_start_keys(m: ModelConfig) -> dict:
    """The keys by which a warm-started model differs from LLaDA's architecture (none for LLaDA's)."""
    keys = {"include_qkv_bias": m.qkv_bias, "weight_tying": m.tie_embeddings,
            "qk_norm": "per_head_rms" if m.qk_norm else None, "head_dim": m.head_dim,
            "rope_scaling": m.rope_scaling, "shift_prediction": m.shift_prediction,
            "mask_token_origin": m.mask_token["origin"] if m.mask_token else None,
            "block_size": m.block_size}  # block diffusion: block-causal attention (docs/block_diffusion.md)
    return {k: v for k, v in keys.items() if v}


def read_config(folder: str | Path) -> dict:
    """config.json, read inside the folder with a size cap (pretrain/hf/folder_files.py)."""
    return read_json(folder, "config.json", CONFIG_MAX_BYTES, "not a Hugging Face model folder")


def model_config_from_hf(config: dict, where: str, attention: str = "auto", name: str = "hf") -> ModelConfig:
    """ModelConfig from a LLaDA config.json; every architecture and size key must be present (no silent
    defaults) and the architecture keys must have the values our model implements."""
    for key, value in ARCHITECTURE.items():
        if key in WARM_START_FIELDS:  # may differ from LLaDA's (see warm_start_keys)
            continue
        if key not in config:
            raise FormatError(f"{where}/config.json has no {key!r} (the published loader would silently default it)")
        if config[key] != value:
            raise FormatError(f"{where}/config.json: {key}={config[key]!r}, this framework builds {key}={value!r}")
    for key in SIZES:
        if key not in config:
            raise FormatError(f"{where}/config.json has no {key!r} (the published loader would silently default it)")
    if config["embedding_size"] != config["vocab_size"]:
        raise FormatError(f"{where}/config.json: embedding_size={config['embedding_size']} differs from "
                          f"vocab_size={config['vocab_size']}; this framework needs them equal")
    sizes = {field: config[key] for key, field in SIZES.items()}
    warm = {field: bool(config.get(key, False)) for key, field in WARM_START_FIELDS.items()}
    qk_norm = config.get("qk_norm")
    if qk_norm not in (None, "per_head_rms"):
        raise FormatError(f"{where}/config.json: qk_norm={qk_norm!r} is not per_head_rms (or absent)")
    mask = {"token": None, "id": config["mask_token_id"], "origin": config["mask_token_origin"]} \
        if "mask_token_origin" in config and "mask_token_id" in config else None
    return model_config({**sizes, **warm, "name": name, "attention": attention,
                         "init_std": config.get("init_std", 0.02), "qk_norm": qk_norm is not None,
                         "head_dim": config.get("head_dim"), "rope_scaling": config.get("rope_scaling"),
                         "shift_prediction": bool(config.get("shift_prediction", False)), "mask_token": mask,
                         "block_size": config.get("block_size")})


def model_config(section: dict) -> ModelConfig:
    """A ModelConfig from a (possibly older or partial) mapping: keys it lacks that do not describe the
    weights (model.init_from, ...) take their defaults from conf/model/tiny.yaml."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), base, {"init_from": None}, section)
    return OmegaConf.to_object(merged)


# What a context-extension stage (docs/long_context.md) may change when it starts from an export: they
# fix where positions sit, not any weight's shape, so the weights load as they are.
CONTEXT_FIELDS = ("max_sequence_length", "rope_theta", "rope_scaling")


def check_matches(found: ModelConfig, expected: ModelConfig, where: str) -> None:
    """The first size key where the folder's model differs from the run's `model=` config; the
    CONTEXT_FIELDS may differ (context_changes lists them)."""
    for key, field in SIZES.items():
        if field in CONTEXT_FIELDS:
            continue
        a, b = getattr(found, field), getattr(expected, field)
        if b is not None and a != b:  # None: model.vocab_size=null, resolved from the data later
            raise FormatError(f"{where}/config.json: {key}={a}, but model.{field}={b} (model={expected.name})")
    for field in ("head_dim", "qkv_bias", "qk_norm", "tie_embeddings", "shift_prediction"):
        a, b = getattr(found, field), getattr(expected, field)
        if a != b:
            raise FormatError(f"{where}/config.json gives model.{field}={a!r}, but model.{field}={b!r} "
                              f"(model={expected.name})")


def context_changes(found: ModelConfig, expected: ModelConfig) -> list[str]:
    """'model.KEY: folder's -> run's' for each CONTEXT_FIELDS value the run changes."""
    return [f"model.{f}: {getattr(found, f)!r} -> {getattr(expected, f)!r}" for f in CONTEXT_FIELDS
            if getattr(found, f) != getattr(expected, f)]


# -- weights ----------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """'5GB', '200KB', '1000' -> bytes (decimal units, as Hugging Face counts them)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not match:
        raise ValueError(f"--max-shard-size={text!r} is not a size such as 5GB, 500MB or 1000000")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match.group(2)]
    return int(float(match.group(1)) * unit)


def plan_shards(shapes: dict[str, torch.Size], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Parameter names per file, in order, each file up to max_bytes (a larger tensor gets its own)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32"}


def write_weights(folder: Path, shapes: dict[str, torch.Size], tensors: Iterable[tuple[str, torch.Tensor]],
                  dtype: torch.dtype, max_bytes: int) -> list[str]:
    """Writes tensors as they come, each straight to its file: one tensor in memory at a time, whatever
    the file size. Names get the published "model." prefix. Returns the files written."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is not")
    shards = plan_shards(shapes, dtype, max_bytes)
    files = [WEIGHTS] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(len(shards))]
    itemsize = torch.empty((), dtype=dtype).element_size()
    stream = iter(tensors)
    for names, file in zip(shards, files, strict=True):
        with open(folder / file, "wb") as f:
            write_safetensors_header(f, {HF_PREFIX + n: shapes[n] for n in names}, dtype)
            for expected in names:
                name, tensor = next(stream)
                if name != expected or tensor.shape != shapes[name]:
                    raise RuntimeError(f"weights came in another order or shape than planned: {name} "
                                       f"{list(tensor.shape)} instead of {expected} {list(shapes[expected])}")
                # the raw little-endian bytes, without a copy beyond the cast
                f.write(tensor.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data)
    if len(files) > 1:
        weight_map = {HF_PREFIX + n: file for names, file in zip(shards, files, strict=True) for n in names}
        total = sum(shapes[n].numel() for n in shapes) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2))
    return files


def write_safetensors_header(f, shapes: dict[str, torch.Size], dtype: torch.dtype) -> None:
    """The safetensors format: an 8-byte little-endian header length, the JSON header (padded with spaces
    to a multiple of 8), then each tensor's bytes in header order. Written by hand so that tensors can
    follow one at a time (safetensors' save_file wants them all at once)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


@dataclass
class HFWeights:
    """The tensors of a folder, read lazily one at a time, under our names (without "model.")."""
    folder: Path
    files: dict[str, str]  # our name -> file

    @staticmethod
    def open(folder: str | Path) -> HFWeights:
        folder = Path(folder)
        files = {}
        for key, file in weight_map(folder).items():
            if not key.startswith(HF_PREFIX):
                raise FormatError(f"{folder}: tensor {key!r} lacks the published {HF_PREFIX!r} prefix")
            files[key[len(HF_PREFIX):]] = file
        return HFWeights(folder, files)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(weights_path(self.folder, self.files[name]), framework="pt") as f:
            return f.get_tensor(HF_PREFIX + name)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.files:
            yield name, self.get(name)

    def shapes(self) -> dict[str, torch.Size]:
        shapes = {}
        for name, file in self.files.items():
            with safe_open(weights_path(self.folder, file), framework="pt") as f:
                shapes[name] = torch.Size(f.get_slice(HF_PREFIX + name).get_shape())
        return shapes

    def check_names(self, expected: dict[str, torch.Size]) -> None:
        """The folder holds exactly the model's parameters, with its shapes (names the first that is not)."""
        found = self.shapes()
        for name in expected:
            if name not in found:
                raise FormatError(f"{self.folder}: no tensor {HF_PREFIX + name}")
        for name, shape in found.items():
            if name not in expected:
                raise FormatError(f"{self.folder}: tensor {HF_PREFIX + name} is not a parameter of the model")
            if tuple(shape) != tuple(expected[name]):
                raise FormatError(f"{self.folder}: {HF_PREFIX + name} has shape {list(shape)}, the model "
                                  f"expects {list(expected[name])}")


# -- tokenizer --------------------------------------------------------------------------------------
def write_tokenizer(folder: Path, tokenizer_json: str, eos: str, mask: str, max_length: int) -> None:
    (folder / "tokenizer.json").write_text(tokenizer_json)
    special = {"eos_token": eos, "pad_token": eos, "mask_token": mask}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "bos_token": None,
              "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
