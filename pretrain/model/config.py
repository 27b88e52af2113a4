"""The network's config: the dense transformer's shape and the mixture of experts (model.* in conf/model/).

Plain dataclasses (no defaults: those live in conf/), composed by the run config (pretrain/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class MoEConfig:
    """model.moe: the feed-forward of every layer from `first_dense_layers` on is a mixture of experts
    (pretrain/model/moe.py): a router picks `top_k` of `num_experts` SwiGLU experts per token, beside
    `num_shared_experts` that every token passes (one SwiGLU of that many experts' width)."""
    num_experts: int
    top_k: int
    expert_hidden_size: int  # each expert's SwiGLU width (LLaDA 2.0: moe_intermediate_size)
    num_shared_experts: int
    first_dense_layers: int  # the first layers keep the dense FFN of mlp_hidden_size (first_k_dense_replace)
    score_func: str  # sigmoid (LLaDA 2.0, DeepSeek V3) | softmax (Qwen3-MoE, Mixtral)
    expert_bias: bool  # a per-expert bias added to the scores for choosing only (auxiliary-loss-free balance)
    bias_update_rate: float  # the bias moves by this toward balance after every optimizer step
    n_group: int  # group-limited routing: experts in n_group groups, tokens choose among topk_group groups
    topk_group: int
    routed_scaling_factor: float  # the routed experts' weights are multiplied by this
    norm_topk_prob: bool  # the top-k weights are divided by their sum (with top_k > 1)
    aux_loss_coef: float  # the load-balancing loss (Switch / DeepSeek); 0: off
    z_loss_coef: float  # the router z-loss (ST-MoE): mean logsumexp(logits)^2; 0: off


@dataclass
class ModelConfig:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    vocab_size: int | None  # None: taken from the data (pretrain.checks.resolve_vocab) before the model is built
    max_sequence_length: int
    rope_theta: float
    rms_norm_eps: float
    init_std: float
    attention: str  # auto | sdpa | flash
    document_mask: bool  # attend only within each packed document (the loop passes the documents' starts)
    init_from: str | None  # a Hugging Face folder: an export of ours, or a Llama / Qwen2 / Qwen3 causal LM
    # What autoregressive sources need (pretrain/hf/causal_import.py); the defaults are LLaDA's.
    head_dim: int | None  # null: d_model / n_heads (Qwen3 sets it apart)
    qkv_bias: bool  # biases on q, k, v (Qwen2)
    qk_norm: bool  # RMSNorm per head on q and k before RoPE (Qwen3)
    tie_embeddings: bool  # the output head is the input embedding (small Llama 3.2 / Qwen models)
    rope_scaling: dict[str, Any] | None  # transformers' Llama 3 dict (rope_type: llama3, factor, ...) or null
    attention_anneal_steps: int  # 0: bidirectional; N: the causal mask relaxed over N steps (DiffuLLaMA)
    shift_prediction: bool  # Dream's shift: the output at i predicts the token at i + 1
    mask_token: dict[str, Any] | None  # {token, id, origin}: filled at start from the source and the data
    block_size: int | None  # the block size the model serves with (block diffusion): filled at start from block.*
    partial_rotary_factor: float  # the share of each head that RoPE turns (1.0; LLaDA 2.0: 0.5, the first half)
    moe: MoEConfig | None  # null: every layer dense; else the mixture of experts below

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe.first_dense_layers

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    @property
    def layer_expert_params(self) -> int:
        """One MoE layer's routed experts, all of them (0 for a dense model)."""
        e = self.moe
        return 0 if e is None else 3 * self.d_model * e.expert_hidden_size * e.num_experts
