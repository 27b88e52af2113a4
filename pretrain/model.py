"""LLaDA's mask predictor: a Llama-style transformer without a causal mask.

Pure torch. Parameter names follow the published Hugging Face checkpoint (GSAI-ML/LLaDA-8B-Base)
with its leading "model." removed, so export and import are a prefix, not a rename table:

    transformer.wte.weight, transformer.blocks.{i}.{attn_norm,ff_norm}.weight,
    transformer.blocks.{i}.{q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out}.weight,
    transformer.ln_f.weight, transformer.ff_out.weight

`python -m pretrain.model model=llada_8b` builds the model on the meta device and prints its
parameter counts as one JSON line.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.attention import select_attention

HF_PREFIX = "model."


@dataclass
class ModelConfig:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    vocab_size: int | None  # None: taken from the data (pretrain.config.resolve_vocab) before the model is built
    max_sequence_length: int
    rope_theta: float
    rms_norm_eps: float
    init_std: float
    attention: str  # auto | sdpa | flash
    init_from: str | None  # a Hugging Face folder (python -m pretrain.export) to start training from

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


# Each layer draws its own initial weights inside its own __init__. Under deepspeed.zero.Init a
# module's parameters are partitioned as soon as its constructor returns, so an init pass over the
# finished model (model.apply) would only see empty shards.
class Linear(nn.Linear):
    def __init__(self, d_in: int, d_out: int, std: float):
        super().__init__(d_in, d_out, bias=False)
        nn.init.normal_(self.weight, mean=0.0, std=std)


class Embedding(nn.Embedding):
    def __init__(self, n: int, d: int, std: float):
        super().__init__(n, d)
        nn.init.normal_(self.weight, mean=0.0, std=std)


class RMSNorm(nn.Module):
    """Normalizes in fp32 whatever the compute dtype: bf16 sums of squares lose too much."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight.to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [L, D] in fp32, the frequencies repeated over both halves (rotate-half form)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]; rotates pairs (i, i + D/2), as LLaDA and Llama do."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention):
        super().__init__()
        d, hd, std = cfg.d_model, cfg.head_dim, cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)  # residual writers: keeps the stream's variance flat in depth
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.attention = attention
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = Linear(d, cfg.n_heads * hd, std)
        self.k_proj = Linear(d, cfg.n_kv_heads * hd, std)
        self.v_proj = Linear(d, cfg.n_kv_heads * hd, std)
        self.attn_out = Linear(cfg.n_heads * hd, d, out_std)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = Linear(d, cfg.mlp_hidden_size, std)  # the SwiGLU gate
        self.up_proj = Linear(d, cfg.mlp_hidden_size, std)
        self.ff_out = Linear(cfg.mlp_hidden_size, d, out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        n = self.attn_norm(x)
        q = apply_rope(self.q_proj(n).view(B, L, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(n).view(B, L, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(n).view(B, L, self.n_kv_heads, self.head_dim)
        h = x + self.attn_out(self.attention(q, k, v).reshape(B, L, -1))
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDAModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        attention = select_attention(cfg.attention)
        self.transformer = nn.ModuleDict(dict(
            wte=Embedding(cfg.vocab_size, cfg.d_model, cfg.init_std),
            blocks=nn.ModuleList(Block(cfg, attention) for _ in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            ff_out=Linear(cfg.d_model, cfg.vocab_size, cfg.init_std),  # untied output head
        ))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> logits [B, L, vocab]. No time input: the mask ratio is read off the input."""
        t = self.transformer
        x = t.wte(input_ids)
        cos, sin = rope_tables(input_ids.shape[1], self.cfg.head_dim, self.cfg.rope_theta, input_ids.device)
        for block in t.blocks:
            x = block(x, cos, sin)
        return t.ff_out(t.ln_f(x))


def count_params(model: nn.Module) -> dict[str, int]:
    """Total parameters and non-embedding parameters (without the input embedding and output head,
    as the LLaDA paper counts them for its 6ND FLOPs)."""
    def numel(p):  # ZeRO-3 leaves an empty placeholder in place of each partitioned parameter
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in model.parameters())
    embedding = numel(model.transformer.wte.weight) + numel(model.transformer.ff_out.weight)
    return {"params": total, "non_embedding_params": total - embedding}


def main(argv: list[str]) -> None:
    from data_pipeline.cli import add_overrides, parser
    from pretrain.config import compose_config, resolve_vocab

    p = parser("pretrain.model", "Builds the model on the meta device (no memory, no data) and prints its parameter "
               "counts as one JSON line.")
    add_overrides(p)
    cfg = compose_config(p.parse_args(argv).overrides)
    resolve_vocab(cfg)
    with torch.device("meta"):
        model = LLaDAModel(cfg.model)
    print(json.dumps({"model": cfg.model.name, **count_params(model)}))


if __name__ == "__main__":
    main(sys.argv[1:])
