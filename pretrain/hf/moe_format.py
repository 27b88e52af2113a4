"""LLaDA 2.0's mixture-of-experts Hugging Face format (inclusionAI/LLaDA2.0-mini, `model_type: llada2_moe`):
config.json, safetensors weights, our own modeling code (pretrain/hf/modeling/*_llada2_moe.py) named
by auto_map. A run with model.moe exports to it (python -m pretrain.export); evaluate, generate and
export read it back.

Names, ours -> theirs (per layer i; q, k, v fused into one matrix, rows q then k then v):
  transformer.wte / ln_f / ff_out             model.word_embeddings / model.norm / lm_head
  blocks.i.attn_norm, ff_norm                  model.layers.i.input_layernorm, post_attention_layernorm
  blocks.i.{q,k,v}_proj                        model.layers.i.attention.query_key_value
  blocks.i.q_norm, k_norm, attn_out            ....attention.query_layernorm, key_layernorm, dense
  blocks.i.{ff_proj, up_proj, ff_out}          ....mlp.{gate_proj, up_proj, down_proj}       (dense layers)
  blocks.i.moe.router.weight, expert_bias      ....mlp.gate.weight, mlp.gate.expert_bias
  blocks.i.moe.experts.{gate,up,down}_proj[j]  ....mlp.experts.j.{gate,up,down}_proj.weight (the Hub's form;
                                               dFactory's merged ....mlp.experts.{gate,up,down}_proj [E, ...]
                                               is read too)
  blocks.i.moe.shared.*                        ....mlp.shared_experts.*
The export holds the whole model in memory once (fine up to a few billion parameters on a CPU host).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.config import ModelConfig
from pretrain.hf.format import INDEX, WEIGHTS, FormatError, installed_transformers, model_config

MODEL_TYPES = ("llada2_moe", "llada2_moe_veomni")  # the Hub's, dFactory's (merged experts)
MODELING_FILES = ("configuration_llada2_moe.py", "modeling_llada2_moe.py")
EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")


def is_llada2(config: dict) -> bool:
    return config.get("model_type") in MODEL_TYPES


def check_exportable(m: ModelConfig) -> None:
    for field, want in (("qk_norm", True), ("qkv_bias", False), ("tie_embeddings", False),
                        ("shift_prediction", False), ("rope_scaling", None)):
        if getattr(m, field) != want:
            raise FormatError(f"model.{field}={getattr(m, field)!r}: LLaDA 2.0's MoE format has {field}={want!r}")


def llada2_config(m: ModelConfig, eos_id: int, mask_id: int, dtype: torch.dtype) -> dict:
    e = m.moe
    config = {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe",
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada2_moe.LLaDA2MoeModelLM",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "num_hidden_layers": m.n_layers, "hidden_size": m.d_model, "intermediate_size": m.mlp_hidden_size,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_size,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_sequence_length, "rope_theta": m.rope_theta,
        "rope_scaling": None, "rms_norm_eps": m.rms_norm_eps, "partial_rotary_factor": m.partial_rotary_factor,
        "rotary_dim": m.rotary_dim, "hidden_act": "silu", "use_bias": False, "use_qkv_bias": False,
        "use_rmsnorm": True, "norm_head": False, "tie_word_embeddings": False, "initializer_range": m.init_std,
        "num_experts": e.num_experts, "num_experts_per_tok": e.top_k, "moe_intermediate_size": e.expert_hidden_size,
        "num_shared_experts": e.num_shared_experts or None, "first_k_dense_replace": e.first_dense_layers,
        "score_function": e.score_func, "moe_router_enable_expert_bias": e.expert_bias, "n_group": e.n_group,
        "topk_group": e.topk_group, "routed_scaling_factor": e.routed_scaling_factor,
        "norm_topk_prob": e.norm_topk_prob, "router_dtype": "fp32",
        # training knobs of ours, kept for a warm start (absent in the Hub's files: 0, none)
        "expert_bias_update_rate": e.bias_update_rate, "router_aux_loss_coef": e.aux_loss_coef,
        "router_z_loss_coef": e.z_loss_coef,
        "eos_token_id": eos_id, "pad_token_id": eos_id, "mask_token_id": mask_id, "use_cache": False,
        "torch_dtype": {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype],
    }
    version = installed_transformers()
    if version:
        config["transformers_version"] = version
    return dict(sorted(config.items()))


def model_config_from_llada2(config: dict, where: str, attention: str = "auto", name: str = "hf") -> ModelConfig:
    try:
        c = config
        hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        if c.get("use_qkv_bias") or c.get("use_bias") or c.get("tie_word_embeddings") or c.get("rope_scaling"):
            raise FormatError(f"{where}/config.json: qkv/bias/tied head/rope_scaling are not built here")
        moe = dict(num_experts=c["num_experts"], top_k=c["num_experts_per_tok"],
                   expert_hidden_size=c["moe_intermediate_size"], num_shared_experts=c.get("num_shared_experts") or 0,
                   first_dense_layers=c["first_k_dense_replace"], score_func=c.get("score_function", "softmax"),
                   expert_bias=bool(c.get("moe_router_enable_expert_bias", False)),
                   bias_update_rate=c.get("expert_bias_update_rate", 0.0), n_group=c.get("n_group") or 1,
                   topk_group=c.get("topk_group") or 1, routed_scaling_factor=c.get("routed_scaling_factor", 1.0),
                   norm_topk_prob=bool(c.get("norm_topk_prob", False)),
                   aux_loss_coef=c.get("router_aux_loss_coef", 0.0), z_loss_coef=c.get("router_z_loss_coef", 0.0))
        rotary = c.get("rotary_dim") or int(hd * c.get("partial_rotary_factor", 1.0))
        return model_config({
            "name": name, "attention": attention, "n_layers": c["num_hidden_layers"], "d_model": c["hidden_size"],
            "n_heads": c["num_attention_heads"], "n_kv_heads": c["num_key_value_heads"], "head_dim": c.get("head_dim"),
            "mlp_hidden_size": c["intermediate_size"], "vocab_size": c["vocab_size"],
            "max_sequence_length": c["max_position_embeddings"], "rope_theta": c["rope_theta"],
            "rms_norm_eps": c["rms_norm_eps"], "init_std": c.get("initializer_range", 0.02), "qk_norm": True,
            "partial_rotary_factor": rotary / hd, "moe": moe})
    except KeyError as e:
        raise FormatError(f"{where}/config.json lacks {e.args[0]!r} (LLaDA 2.0 MoE)") from None


# -- names --------------------------------------------------------------------------------------------
def _layer_names(m: ModelConfig, i: int) -> dict[str, str]:
    """ours -> theirs for the one-to-one tensors of layer i (the fused qkv and the experts apart)."""
    ours, theirs = f"transformer.blocks.{i}.", f"model.layers.{i}."
    names = {"attn_norm.weight": "input_layernorm.weight", "ff_norm.weight": "post_attention_layernorm.weight",
             "q_norm.weight": "attention.query_layernorm.weight", "k_norm.weight": "attention.key_layernorm.weight",
             "attn_out.weight": "attention.dense.weight"}
    if m.is_moe_layer(i):
        names |= {"moe.router.weight": "mlp.gate.weight", "moe.router.expert_bias": "mlp.gate.expert_bias"}
        if m.moe.num_shared_experts:
            names |= {f"moe.shared.{p}.weight": f"mlp.shared_experts.{p}.weight" for p in EXPERT_PROJ}
    else:
        names |= {"ff_proj.weight": "mlp.gate_proj.weight", "up_proj.weight": "mlp.up_proj.weight",
                  "ff_out.weight": "mlp.down_proj.weight"}
    return {ours + a: theirs + b for a, b in names.items()}


TOP = {"transformer.wte.weight": "model.word_embeddings.weight", "transformer.ln_f.weight": "model.norm.weight",
       "transformer.ff_out.weight": "lm_head.weight"}


def to_llada2(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (parameters and the expert-bias buffers) -> the Hub's tensors."""
    out = {theirs: state[ours] for ours, theirs in TOP.items()}
    for i in range(m.n_layers):
        out |= {theirs: state[ours] for ours, theirs in _layer_names(m, i).items()}
        b = f"transformer.blocks.{i}."
        out[f"model.layers.{i}.attention.query_key_value.weight"] = torch.cat(
            [state[b + f"{p}_proj.weight"] for p in "qkv"])
        if m.is_moe_layer(i):
            for p in EXPERT_PROJ:
                for j, w in enumerate(state[b + f"moe.experts.{p}"]):
                    out[f"model.layers.{i}.mlp.experts.{j}.{p}.weight"] = w
    return out


def from_llada2(get, names: set[str], m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) from a folder's tensors (`get(name)`, `names` the folder's): per-expert or merged."""
    for ours, theirs in TOP.items():
        yield ours, get(theirs)
    H, KV, hd = m.n_heads, m.n_kv_heads, m.head_size
    for i in range(m.n_layers):
        for ours, theirs in _layer_names(m, i).items():
            if theirs in names:  # an absent expert bias: zeros (below)
                yield ours, get(theirs)
        q, k, v = get(f"model.layers.{i}.attention.query_key_value.weight").split([H * hd, KV * hd, KV * hd])
        b = f"transformer.blocks.{i}."
        yield from ((b + "q_proj.weight", q), (b + "k_proj.weight", k), (b + "v_proj.weight", v))
        if m.is_moe_layer(i):
            if f"model.layers.{i}.mlp.gate.expert_bias" not in names:
                yield b + "moe.router.expert_bias", torch.zeros(m.moe.num_experts)
            for p in EXPERT_PROJ:
                merged = f"model.layers.{i}.mlp.experts.{p}"  # dFactory's
                yield b + f"moe.experts.{p}", get(merged) if merged in names else torch.stack(
                    [get(f"model.layers.{i}.mlp.experts.{j}.{p}.weight") for j in range(m.moe.num_experts)])


class LLaDA2Weights:
    """A LLaDA 2.0 MoE folder's tensors under our names (expert biases included, as buffers)."""

    def __init__(self, folder: str | Path, m: ModelConfig):
        self.folder, self.model = Path(folder), m
        if (self.folder / INDEX).is_file():
            self.files = json.loads((self.folder / INDEX).read_text())["weight_map"]
        elif (self.folder / WEIGHTS).is_file():
            with safe_open(self.folder / WEIGHTS, framework="pt") as f:
                self.files = {k: WEIGHTS for k in f.keys()}
        else:
            raise FormatError(f"{folder}: neither {WEIGHTS} nor {INDEX}")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise FormatError(f"{self.folder}: no tensor {name}")
        with safe_open(self.folder / self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return from_llada2(self.get, set(self.files), self.model)


def export_llada2(folder: Path, state: dict[str, torch.Tensor], m: ModelConfig, eos_id: int, mask_id: int,
                  dtype: torch.dtype) -> list[str]:
    """Writes config.json, model.safetensors and the modeling code into `folder`; the expert bias stays fp32."""
    from pretrain.hf.modeling import MODELING_DIR

    check_exportable(m)
    tensors = {k: (v.float() if k.endswith("expert_bias") else v.to(dtype)).contiguous()
               for k, v in to_llada2(state, m).items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(llada2_config(m, eos_id, mask_id, dtype), indent=2) + "\n")
    for name in MODELING_FILES:
        (folder / name).write_bytes((MODELING_DIR / name).read_bytes())
    return [WEIGHTS]


def checkpoint_buffers(directory: Path) -> dict[str, torch.Tensor]:
    """The module's buffers (the expert biases) as DeepSpeed saved them with the model states."""
    from pretrain.checkpoint import ds_names
    from pretrain.checkpoint.expert_files import buffers
    from pretrain.checkpoint.zero_files import load_engine_file

    states = load_engine_file(ds_names.model_files(directory)[0])
    return {k: v.float() for k, v in buffers(states).items() if re.search(r"\.expert_bias$", k)}


def folder_buffers(folder: str | Path, m: ModelConfig) -> dict[str, torch.Tensor]:
    w = LLaDA2Weights(folder, m)
    out = {}
    for i in range(m.n_layers):
        if m.is_moe_layer(i):
            name = f"model.layers.{i}.mlp.gate.expert_bias"
            out[f"transformer.blocks.{i}.moe.router.expert_bias"] = \
                w.get(name).float() if name in w.files else torch.zeros(m.moe.num_experts)
    return out


class OursNamed(dict):
    """A LLaDA 2.0 folder's tensors already under our names (model.init_from's rank 0 holds them all)."""

    def get(self, name: str) -> torch.Tensor:  # HFWeights' interface
        return self[name]


def check_llada2_matches(found: ModelConfig, expected: ModelConfig, where: str) -> None:
    """model.init_from: the folder's shapes and routing are the run's model= (the bias rate and the losses
    may differ)."""
    keys = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_size", "mlp_hidden_size", "vocab_size",
            "rope_theta", "partial_rotary_factor")
    for key in keys:
        a, b = getattr(found, key), getattr(expected, key)
        if b is not None and a != b:
            raise FormatError(f"{where}/config.json gives model.{key}={a!r}, but model.{key}={b!r} "
                              f"(model={expected.name})")
    if expected.moe is None or not expected.qk_norm:
        raise FormatError(f"{where} is a LLaDA 2.0 mixture of experts; model={expected.name} is not (model.moe, "
                          f"model.qk_norm)")
    for key in ("num_experts", "top_k", "expert_hidden_size", "num_shared_experts", "first_dense_layers",
                "score_func", "expert_bias", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob"):
        a, b = getattr(found.moe, key), getattr(expected.moe, key)
        if a != b:
            raise FormatError(f"{where}/config.json gives model.moe.{key}={a!r}, but model.moe.{key}={b!r}")
