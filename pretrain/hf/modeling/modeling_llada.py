"""LLaDA's Hugging Face model class, shipped by llada-pretrain in every exported folder (next to
config.json, whose `auto_map` names it). It imports only torch and transformers (4.57 to 5.x), so

    AutoModel.from_pretrained(folder, trust_remote_code=True)            # or AutoModelForCausalLM

works offline with nothing else installed. `model(input_ids, attention_mask=None).logits` [B, L, vocab]
are llada-pretrain's logits (pretrain/model/transformer.py; the same fp32 arithmetic: RMSNorm and RoPE
in fp32, SDPA attention without a causal mask). Parameter names are the published checkpoint's
(GSAI-ML/LLaDA-8B-Base): model.transformer.{wte, blocks.{i}.{attn_norm, q_proj, k_proj, v_proj,
attn_out, ff_norm, ff_proj, up_proj, ff_out}, ln_f, ff_out}.

`model.generate(input_ids, attention_mask=None, gen_length=128, steps=128, ...)` samples by iterative
unmasking with llada-pretrain's sampler (sampling_llada.py, a copy of pretrain/objective/sampler.py:
the same tokens as `python -m pretrain.generate`), including its fast options (`threshold`, `factor`,
`cache="prefix"` or `"dual"`, kv_cache_llada.py); prompts of a batch are left-padded, with 0 in
`attention_mask` on the padding. A block diffusion model (config.block_size) is sampled block by block,
each row alone, at its blocks' absolute positions, with the exact cache `cache="block"`.
`attention_mask` [B, L] (1 = a real token) keeps padding out of every token's attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig
from .kv_cache_llada import make_cache
from .sampling_llada import generate as diffusion_generate
from .sampling_llada import generate_block_rows

# Keys of the published config.json that would change the architecture, with the only value built here.
# Absent means this value; another value is refused rather than silently built differently.
FIXED = {"block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "rope": True,
         "include_bias": False, "bias_for_layer_norm": False, "alibi": False, "attention_layer_norm": False,
         "input_emb_norm": False, "scale_logits": False, "layer_norm_with_affine": True, "block_group_size": 1}
QK_NORMS = (None, "per_head_rms")


def check_config(config: LLaDAConfig) -> None:
    for key, value in FIXED.items():
        if getattr(config, key, value) != value:
            raise ValueError(f"config.json: {key}={getattr(config, key)!r}, this modeling code builds {key}={value!r}")
    if config.qk_norm not in QK_NORMS:
        raise ValueError(f"config.json: qk_norm={config.qk_norm!r} is not one of {QK_NORMS}")
    if config.d_model % config.n_heads or config.n_heads % config.n_kv_heads:
        raise ValueError(f"config.json: d_model={config.d_model}, n_heads={config.n_heads}, "
                         f"n_kv_heads={config.n_kv_heads} do not divide")
    scaling = config.rope_scaling
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind not in ("llama3", "default"):
            raise ValueError(f"config.json: rope_scaling={scaling!r}; only rope_type 'llama3' is implemented")


def inverse_frequencies(config: LLaDAConfig) -> torch.Tensor:
    """RoPE's inverse frequencies [head_dim / 2] in fp32, with Llama 3's scaling where rope_scaling asks."""
    head_dim = getattr(config, "head_dim", None) or config.d_model // config.n_heads  # head_dim: a Qwen3 warm start
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    s = config.rope_scaling
    if not s or s.get("rope_type", s.get("type")) != "llama3":
        return inv_freq
    # Llama 3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_tables(config: LLaDAConfig, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] in fp32, the frequencies repeated over both halves (rotate-half form).
    Computed per forward, not stored: no buffer for from_pretrained to leave uninitialized."""
    inv_freq = inverse_frequencies(config).to(device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]; rotates pairs (i, i + D/2), in fp32."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos[:, None, :] + torch.cat([-x2, x1], dim=-1) * sin[:, None, :]).to(x.dtype)


class RMSNorm(nn.Module):
    """Normalizes in fp32 whatever the compute dtype."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight.to(x.dtype)


class LLaDABlock(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hd = config.d_model, getattr(config, "head_dim", None) or config.d_model // config.n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        bias = bool(config.include_qkv_bias)
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=bias)
        if config.qk_norm == "per_head_rms":
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.attn_out = nn.Linear(config.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)  # the SwiGLU gate
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def attention(self, q, k, v, mask):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.n_heads != self.n_kv_heads:
            groups = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False).transpose(1, 2)

    def forward(self, x, cos, sin, mask=None, kv=None):
        B, L, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(n).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(n).view(B, L, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3's order: per-head norm, then RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # a KV cache's hook (kv_cache_llada.py): this window's k, v -> those to attend to
            k, v = kv(k, v)
        h = x + self.attn_out(self.attention(q, k, v, mask).reshape(B, L, -1))
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.embedding_size, config.d_model),
                       blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                       ln_f=RMSNorm(config.d_model, config.rms_norm_eps))
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.transformer = nn.ModuleDict(modules)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=False,
                cache=None):
        t = self.transformer
        x = t.wte(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = rope_tables(self.config, x.shape[1] if cache is None else cache.length, x.device)
        if cache is not None:  # the input is the cache's window of the sequence
            cos, sin = cache.positions(cos, sin)
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() == 2:  # [B, L]: 1 for tokens, 0 for padding, which no token attends to
                mask = attention_mask.bool()[:, None, None, :]
            else:  # [B, 1 or H, L, L], as SDPA takes it: bool (True = attend) or additive
                mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(x.dtype)
        if getattr(self.config, "block_size", None):  # block diffusion: a block sees itself and the blocks before it
            if cache is not None:  # the window's rows, over the cached keys and its own
                causal = cache.mask(x.device)
            else:
                block = torch.arange(x.shape[1], device=x.device) // self.config.block_size
                causal = (block[:, None] >= block[None, :])[None, None]
            mask = causal if mask is None else (mask & causal if mask.dtype == torch.bool
                                                else mask.masked_fill(~causal, float("-inf")))
        hidden = [x] if output_hidden_states else None
        for i, block in enumerate(t.blocks):
            x = block(x, cos, sin, mask, None if cache is None else cache.layer(i))
            if hidden is not None:
                hidden.append(x)
        x = t.ln_f(x)
        logits = F.linear(x, t.wte.weight) if self.config.weight_tying else t.ff_out(x)
        if self.config.shift_prediction:  # Dream: position i's logits predict token i + 1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits, (tuple(hidden) if hidden is not None else None)


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        check_config(config)
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Fresh weights (from_config); from_pretrained overwrites them with the folder's."""
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return None if self.config.weight_tying else self.model.transformer.ff_out

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs):
        """input_ids [B, L] -> CausalLMOutputWithPast with logits [B, L, vocab] (no loss: LLaDA's loss needs
        the masking, see llada-pretrain). Accepts and ignores use_cache=False and past_key_values=None."""
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise ValueError("LLaDA has no KV cache: every step sees the whole sequence")
        if kwargs.get("labels") is not None:
            raise ValueError("LLaDA's loss needs the masked diffusion objective; no loss from labels here")
        logits, hidden = self.model(input_ids, attention_mask, inputs_embeds, bool(output_hidden_states))
        if return_dict is False:
            return (logits,) if hidden is None else (logits, hidden)
        return CausalLMOutputWithPast(logits=logits, hidden_states=hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, gen_length: int = 128,
                 steps: int = 128, block_length: int | None = None, temperature: float = 0.0, cfg_scale: float = 0.0,
                 remasking: str = "low_confidence", threshold: float | None = None, factor: float | None = None,
                 cache: str | None = None, seed: int = 0) -> torch.LongTensor:
        """input_ids [B, P] (left-padded, attention_mask 0 on the padding) -> [B, P + gen_length]: the prompt
        and its answer, by llada-pretrain's sampler; the settings are pretrain.generate's (its --help)."""
        prompt_mask = None if attention_mask is None or bool(attention_mask.bool().all()) else attention_mask.bool()

        block_size = getattr(self.config, "block_size", None)
        make_cache(cache, block_size)  # a cache that does not serve this model is refused before any pass

        def forward(ids, attention_mask=None, cache=None, block_size=None):  # block_size: the config's, above
            return self.model(ids, attention_mask, None, False, cache)[0]

        if block_size:
            return generate_block_rows(forward, input_ids, prompt_mask, gen_length, steps, self.config.mask_token_id,
                                       block_size, temperature, cfg_scale, remasking, seed, threshold, factor,
                                       lambda: make_cache(cache, block_size))
        return diffusion_generate(forward, input_ids, gen_length, steps, self.config.mask_token_id, block_length,
                                  temperature, cfg_scale, remasking, seed, threshold, factor, prompt_mask,
                                  make_cache(cache, None))
