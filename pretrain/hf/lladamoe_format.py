"""LLaDA-MoE's Hugging Face format (inclusionAI/LLaDA-MoE-7B-A1B-Base and -Instruct): config.json
(`LLaDAMoEConfig`; architectures `LLaDAMoEModelLM`; model_type `llada` on the Hub, `lladamoe` or
`llada_moe` in some copies, so the architecture decides), safetensors weights, tokenizer.json. Read only:
`model.init_from=FOLDER` starts a run from it (through pretrain/hf/causal_import.py, as a Qwen3-MoE
source), and open_source / load_model (evaluate, generate, export) read it.

What the published modeling code (modeling_lladamoe.py, `trust_remote_code`) computes, and how it maps:
  - a pre-norm transformer, bidirectional attention (no mask), RMSNorm (eps rms_norm_eps, default
    1e-5), SwiGLU (silu) feed-forwards, untied head unless tie_word_embeddings; no embedding scaling.
  - attention: q/k/v/o without bias (attention_bias), head dim hidden_size / num_attention_heads, GQA by
    num_key_value_heads; with qk_layernorm, RMSNorm per head on q and k (one [head_dim] weight each,
    q_norm / k_norm) before RoPE; rotate-half RoPE (rope_theta) on the first head_dim x
    partial_rotary_factor dims of each head, the rest passing (our partial_rotary_factor).
  - layers: moe_layer_freq[i] == 0 is a dense SwiGLU of dense_intermediate_size, any other value a
    mixture of experts; ours are the first dense layers then MoE (model.moe.first_dense_layers).
  - the mixture: router logits = mlp.gate(x); softmax in fp32 over num_experts; the top
    num_experts_per_tok probabilities weight their experts as they are (the code sets norm_topk_prob =
    False whatever config.json says: not renormalised, not scaled); experts of expert_intermediate_size;
    with shared_expert_intermediate_size (not null), one more SwiGLU that every token passes, added
    ungated (ours: num_shared_experts = that size / expert_intermediate_size).
Refused, one line naming the key: an activation other than silu, attention_bias, clip_qkv (q/k/v
clamped), moe_router_enable_expert_bias (theirs adds the bias to the probabilities and weights the experts
with it; ours steers the choice only), a moe_layer_freq whose dense layers are not the first ones, a
shared expert not a whole number of experts wide, RoPE scaling other than Llama 3's, and keys the
published forward never reads but that would mean another model (moe_router_score_function other than
softmax, routed_scaling_factor other than 1, router_num_group / router_topk_group above 1).

Names, theirs (under model.layers.{i}.) -> ours (transformer.blocks.{i}.): the Qwen3-MoE names of
causal_import.LAYER_NAMES (self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, input_layernorm,
post_attention_layernorm, mlp.{gate,up,down}_proj for a dense layer, mlp.gate -> moe.router,
mlp.experts.{j}.{gate,up,down}_proj stacked into moe.experts.*), plus shared_expert.* -> moe.shared.*;
model.embed_tokens, model.norm, lm_head as Llama's.

The mask token: LLaDA-MoE was trained with `<|mask|>` (id 156895; the model card's mask_id, absent from
the Hub's config.json). open_source takes config.json's mask_token_id when there is one, else the id of
`<|mask|>` in the folder's tokenizer.json. The data pipeline takes a tokenizer's own diffusion mask token
(data_pipeline/tokenizer.DIFFUSION_MASKS: `<|mdm_mask|>`, then `<|mask|>`), so shards built with its
tokenizer and a warm start (model.init_from, causal_import.mask_choice) use `<|mask|>` with its trained rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.config import ModelConfig
from pretrain.hf.folder_files import FormatError, weights_path

ARCHITECTURES = {"LLaDAMoEModelLM": "llada_moe", "LLaDAMoEModel": "llada_moe"}
MODEL_TYPES = ("lladamoe", "llada_moe")  # dllm's renamed copies; the Hub's config.json says "llada"
MASK = "<|mask|>"
LAYER_NAMES = {f"shared_expert.{p}.weight": f"moe.shared.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}


def is_lladamoe(config: dict) -> bool:
    return (any(a in ARCHITECTURES for a in config.get("architectures") or [])
            or config.get("model_type") in MODEL_TYPES)


def _refuse(where: str, key: str, value, why: str) -> FormatError:
    return FormatError(f"{where}/config.json: {key}={value!r} is not supported ({why})")


def moe_fields(config: dict, where: str) -> dict:
    """model.moe of a LLaDA-MoE config.json (softmax, top k, not renormalised, its dense layers first)."""
    n = config["num_hidden_layers"]
    freq = config.get("moe_layer_freq")
    if not isinstance(freq, list) or len(freq) != n or not all(isinstance(f, int) for f in freq):
        raise _refuse(where, "moe_layer_freq", freq, f"a list of {n} integers, one per layer, is needed")
    dense = next((i for i, f in enumerate(freq) if f != 0), n)  # the leading zeros: the dense layers
    if any(f == 0 for f in freq[dense:]):
        raise _refuse(where, "moe_layer_freq", freq, "our MoE layers are every layer after the first dense ones")
    expert = config["expert_intermediate_size"]
    shared = config.get("shared_expert_intermediate_size", -1)  # their class's default: -1, no usable size
    if shared is not None and not (isinstance(shared, int) and shared > 0 and shared % expert == 0):
        raise _refuse(where, "shared_expert_intermediate_size", shared,
                      f"null, or a multiple of expert_intermediate_size={expert}: our shared experts are "
                      "whole experts wide")
    if config.get("moe_router_enable_expert_bias"):
        raise _refuse(where, "moe_router_enable_expert_bias", config["moe_router_enable_expert_bias"],
                      "theirs is added to the softmax probabilities and weights the experts; ours steers the "
                      "choice only")
    score = config.get("moe_router_score_function")
    if score not in (None, "softmax"):
        raise _refuse(where, "moe_router_score_function", score, "the published forward routes by softmax")
    scale = config.get("routed_scaling_factor")
    if scale not in (None, 1):
        raise _refuse(where, "routed_scaling_factor", scale, "the published forward does not scale the experts")
    for key in ("router_num_group", "router_topk_group"):
        if isinstance(config.get(key), int) and config[key] > 1:
            raise _refuse(where, key, config[key], "the published forward routes over all experts, not groups")
    return dict(num_experts=config["num_experts"], top_k=config["num_experts_per_tok"], expert_hidden_size=expert,
                num_shared_experts=0 if shared is None else shared // expert, first_dense_layers=dense,
                score_func="softmax", expert_bias=False, bias_update_rate=0.0, n_group=1, topk_group=1,
                routed_scaling_factor=1.0, norm_topk_prob=False,  # hard-coded False by the published code
                aux_loss_coef=float(config.get("router_aux_loss_coef") or 0.0), z_loss_coef=0.0)


def source_fields(config: dict, where: str) -> dict:
    """The model.* values of a LLaDA-MoE config.json (causal_import.source_fields' keys); missing keys take
    the published LLaDAMoEConfig's defaults, except those whose default builds no model (-1)."""
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "expert_intermediate_size",
                "num_experts", "num_experts_per_tok", "rope_theta", "partial_rotary_factor"):
        if key not in config:
            raise FormatError(f"{where}/config.json has no {key!r}")
    refused = [("hidden_act", config.get("hidden_act", "silu") != "silu", "our feed-forwards are SwiGLU with silu"),
               ("attention_bias", bool(config.get("attention_bias")), "our attention has no biases on o_proj"),
               ("clip_qkv", config.get("clip_qkv") is not None, "our attention does not clamp q, k, v")]
    for key, bad, why in refused:
        if bad:
            raise _refuse(where, key, config[key], why)
    d, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, d // heads):
        raise _refuse(where, "head_dim", config["head_dim"], f"the published attention uses hidden_size / "
                      f"num_attention_heads = {d // heads}")
    factor = config["partial_rotary_factor"]
    if not (isinstance(factor, (int, float)) and 0 < factor <= 1):
        raise _refuse(where, "partial_rotary_factor", factor, "RoPE turns a share in (0, 1] of each head")
    scaling = config.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise _refuse(where, "rope_scaling", scaling, "only Llama 3's")
    moe = moe_fields(config, where)
    dense = config.get("dense_intermediate_size", -1)
    if moe["first_dense_layers"] and not (isinstance(dense, int) and dense > 0):
        raise _refuse(where, "dense_intermediate_size", dense, "the dense layers of moe_layer_freq need a width")
    return dict(moe=moe, n_layers=config["num_hidden_layers"], d_model=d, n_heads=heads,
                n_kv_heads=config.get("num_key_value_heads") or heads,
                # no dense layer: the width is unused (the Hub's file has 8192)
                mlp_hidden_size=dense if isinstance(dense, int) and dense > 0 else moe["expert_hidden_size"],
                vocab_size=config["vocab_size"], max_sequence_length=config.get("max_position_embeddings", 4096),
                rope_theta=float(config["rope_theta"]), rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                head_dim=None, qkv_bias=False, qk_norm=bool(config.get("qk_layernorm")),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                rope_scaling=None if scaling is None else {k: scaling[k] for k in sorted(scaling) if k != "type"},
                partial_rotary_factor=float(factor))


# -- open_source: the folder as a trained model (evaluate, generate, export; pretrain/hf/pretrained.py) --
def mask_id(config: dict, folder: str | Path) -> int:
    """config.json's mask_token_id, else the id of <|mask|> in the folder's tokenizer.json."""
    from tokenizers import Tokenizer

    if "mask_token_id" in config:
        return config["mask_token_id"]
    path = weights_path(folder, "tokenizer.json", "a model folder holds its tokenizer")
    found = Tokenizer.from_file(str(path)).token_to_id(MASK)
    if found is None:
        raise FormatError(f"{folder}/config.json has no 'mask_token_id' and its tokenizer.json has no {MASK}")
    return found


def folder_buffers(model: ModelConfig) -> dict[str, torch.Tensor]:
    """The routers' expert biases: zeros (LLaDA-MoE's are refused, moe_router_enable_expert_bias)."""
    return {f"transformer.blocks.{i}.moe.router.expert_bias": torch.zeros(model.moe.num_experts)
            for i in range(model.n_layers) if model.is_moe_layer(i)}
