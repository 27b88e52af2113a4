"""LLaDA 2.0's mixture-of-experts Hugging Face model class (inclusionAI/LLaDA2.0-mini's parameter names),
shipped by llada-pretrain in every MoE export (config.json's auto_map names it). It imports only torch
and transformers, so

    AutoModel.from_pretrained(folder, trust_remote_code=True)            # or AutoModelForCausalLM

works offline. `model(input_ids, attention_mask=None).logits` [B, L, vocab] are llada-pretrain's logits
(pretrain/model/transformer.py and moe.py, the same fp32 arithmetic: RMSNorm, RoPE on the first
rotary_dim of each head, routing in fp32; bidirectional SDPA attention). The experts are one module per
expert (mlp.experts.{j}.{gate,up,down}_proj), as on the Hub. No KV cache and no generate(): a masked
diffusion model is sampled by iterative unmasking (python -m pretrain.generate).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada2_moe import LLaDA2MoeConfig


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight.to(x.dtype)


def rotary_dim(config) -> int:
    return config.rotary_dim or int(config.head_dim * config.partial_rotary_factor)


def rope_tables(config, seq_len: int, device):
    dim = rotary_dim(config)
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x [B, L, H, D]: the first cos.shape[-1] dims turn (rotate-half pairs), in fp32; the rest pass."""
    r = cos.shape[-1]
    x32, rest = x[..., :r].float(), x[..., r:]
    x1, x2 = x32.chunk(2, dim=-1)
    turned = (x32 * cos[:, None, :] + torch.cat([-x2, x1], dim=-1) * sin[:, None, :]).to(x.dtype)
    return torch.cat([turned, rest], dim=-1)


class MLP(nn.Module):
    def __init__(self, d: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, width, bias=False)
        self.up_proj = nn.Linear(d, width, bias=False)
        self.down_proj = nn.Linear(width, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x):
        c = self.config
        logits = F.linear(x.float(), self.weight.float())
        scores = torch.sigmoid(logits) if c.score_function == "sigmoid" else logits.softmax(-1)
        choice = scores + self.expert_bias.float() if c.moe_router_enable_expert_bias else scores
        if (c.n_group or 1) > 1:  # the topk_group groups with the best sums of their two best experts
            T = choice.shape[0]
            grouped = choice.view(T, c.n_group, -1)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(c.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        idx = choice.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, idx)
        if c.norm_topk_prob and c.num_experts_per_tok > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return idx, weights * c.routed_scaling_factor


class SparseMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.gate = Gate(config)
        self.experts = nn.ModuleList(MLP(d, config.moe_intermediate_size) for _ in range(config.num_experts))
        self.shared_experts = MLP(d, config.moe_intermediate_size * config.num_shared_experts) \
            if config.num_shared_experts else None

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weights = self.gate(flat)
        T, k = idx.shape
        order = idx.flatten().argsort(stable=True)
        token = order // k
        counts = torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()
        outs = [expert(rows) for expert, rows in zip(self.experts, flat[token].split(counts), strict=True)]
        y = torch.cat(outs).float() * weights.flatten()[order, None]
        y = torch.zeros(T, shape[-1], dtype=torch.float32, device=x.device).index_add_(0, token, y).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim or config.hidden_size // config.num_attention_heads
        self.h, self.kv, self.hd = config.num_attention_heads, config.num_key_value_heads, hd
        self.query_key_value = nn.Linear(d, (self.h + 2 * self.kv) * hd, bias=False)
        self.query_layernorm = RMSNorm(hd, config.rms_norm_eps)
        self.key_layernorm = RMSNorm(hd, config.rms_norm_eps)
        self.dense = nn.Linear(self.h * hd, d, bias=False)

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        q, k, v = self.query_key_value(x).view(B, L, self.h + 2 * self.kv, self.hd).split([self.h, self.kv, self.kv], 2)
        q, k = apply_rope(self.query_layernorm(q), cos, sin), apply_rope(self.key_layernorm(k), cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.h != self.kv:
            k, v = k.repeat_interleave(self.h // self.kv, dim=1), v.repeat_interleave(self.h // self.kv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        return self.dense(o.transpose(1, 2).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config) if layer >= config.first_k_dense_replace else \
            MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask):
        h = x + self.attention(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class LLaDA2MoeModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=False):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = rope_tables(self.config, x.shape[1], x.device)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :] if attention_mask.dim() == 2 else attention_mask
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
            if hidden is not None:
                hidden.append(x)
        return self.norm(x), (tuple(hidden) if hidden is not None else None)


class LLaDA2MoeModelLM(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: LLaDA2MoeConfig):
        if config.use_qkv_bias or config.use_bias or config.hidden_act != "silu":
            raise ValueError("config.json: use_qkv_bias/use_bias/hidden_act other than LLaDA 2.0's are not built here")
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Gate):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise ValueError("no KV cache here: every step sees the whole sequence")
        x, hidden = self.model(input_ids, attention_mask, inputs_embeds, bool(output_hidden_states))
        logits = self.lm_head(x)
        if return_dict is False:
            return (logits,) if hidden is None else (logits, hidden)
        return CausalLMOutputWithPast(logits=logits, hidden_states=hidden)
