"""LLaDA's mask predictor: a Llama-style transformer without a causal mask.

Pure torch. Parameter names follow the published Hugging Face checkpoint (GSAI-ML/LLaDA-8B-Base)
with its leading "model." removed, so export and import are a prefix, not a rename table:

    transformer.wte.weight, transformer.blocks.{i}.{attn_norm,ff_norm}.weight,
    transformer.blocks.{i}.{q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out}.weight,
    transformer.ln_f.weight, transformer.ff_out.weight

Speed without changing what is stored: an FFN width that is not a multiple of 64 (LLaDA 1B's 5634)
is padded with zero rows/columns inside the forward only (aligned tensor-core kernels; exact, since
a padded unit outputs silu(0) * 0 = 0), so names, shapes, counts and checkpoints keep the configured
width. Activation checkpointing (`set_activation_checkpointing`) and regional torch.compile
(`compile_blocks`) are switched on by the engine from trainer.*.

Warm starts from autoregressive models (pretrain/hf/causal_import.py) add, each behind a model.* key
whose default is LLaDA's: biases on q, k, v (`qkv_bias`, Qwen2); RMSNorm per head on q and k before
RoPE (`qk_norm`, Qwen3); a head_dim apart from d_model / n_heads (`head_dim`, Qwen3); the output head
tied to the input embedding (`tie_embeddings`: one parameter, `transformer.wte.weight`, and no
`transformer.ff_out.weight`); Llama 3's RoPE scaling (`rope_scaling`, pretrain/model/rope.py); the
causal mask relaxed over the first steps (`attention_anneal_steps`, pretrain/model/anneal.py); and
Dream's shifted prediction (`shift_prediction`, `shift_hidden` below).

A mixture of experts (`model.moe`, pretrain/model/moe.py) replaces the feed-forward of the layers from
`moe.first_dense_layers` on (names `blocks.{i}.moe.*`); `partial_rotary_factor` < 1 turns only the
first part of each head (LLaDA 2.0: half).

`check_config` is the model's start-up check (run by pretrain/checks.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from pretrain.config import ConfigError, ModelConfig, require
from pretrain.model.anneal import annealed_mask
from pretrain.model.attention import sdpa_attention, select_attention
from pretrain.model.block_attention import block_causal, select_block_attention
from pretrain.model.kv_cache import BlockKVCache, KVCache
from pretrain.model.moe import MoEFeedForward, check_moe
from pretrain.model.output_head import OutputHead
from pretrain.model.rope import apply_rope, check_scaling, rope_tables

HF_PREFIX = "model."


# Each layer draws its own initial weights inside its own __init__. Under deepspeed.zero.Init a
# module's parameters are partitioned as soon as its constructor returns, so an init pass over the
# finished model (model.apply) would only see empty shards.
class Linear(nn.Linear):
    def __init__(self, d_in: int, d_out: int, std: float, bias: bool = False):
        super().__init__(d_in, d_out, bias=bias)
        nn.init.normal_(self.weight, mean=0.0, std=std)
        if bias:
            nn.init.zeros_(self.bias)


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


FFN_ALIGN = 64


def padded_width(n: int, multiple: int = FFN_ALIGN) -> int:
    return -(-n // multiple) * multiple


class Block(nn.Module):
    """Under ZeRO-3 the engine makes each block a leaf module: its pre-forward hook gathers all of
    the block's weights at once, so forward may use them directly (the padded FFN) and may be
    compiled as one region with no ZeRO hooks inside."""

    def __init__(self, cfg: ModelConfig, attention, layer: int = 0):
        super().__init__()
        d, hd, std = cfg.d_model, cfg.head_size, cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)  # residual writers: keeps the stream's variance flat in depth
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.ffn_pad = padded_width(cfg.mlp_hidden_size) - cfg.mlp_hidden_size
        self.attention = attention
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = Linear(d, cfg.n_heads * hd, std, bias=cfg.qkv_bias)
        self.k_proj = Linear(d, cfg.n_kv_heads * hd, std, bias=cfg.qkv_bias)
        self.v_proj = Linear(d, cfg.n_kv_heads * hd, std, bias=cfg.qkv_bias)
        if cfg.qk_norm:  # Qwen3: per head, after the projection, before RoPE
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.attn_out = Linear(cfg.n_heads * hd, d, out_std)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.moe = MoEFeedForward(cfg, std, out_std) if cfg.is_moe_layer(layer) else None  # pretrain/model/moe.py
        if self.moe is None:
            self.ff_proj = Linear(d, cfg.mlp_hidden_size, std)  # the SwiGLU gate
            self.up_proj = Linear(d, cfg.mlp_hidden_size, std)
            self.ff_out = Linear(cfg.mlp_hidden_size, d, out_std)

    def ffn(self, m: torch.Tensor) -> torch.Tensor:
        if self.moe is not None:
            return self.moe(m)
        gate, up, out = self.ff_proj.weight, self.up_proj.weight, self.ff_out.weight
        if self.ffn_pad:  # zero units: silu(0) * 0 = 0 in, zero columns out; their gradients are cut off by the pad
            gate, up = F.pad(gate, (0, 0, 0, self.ffn_pad)), F.pad(up, (0, 0, 0, self.ffn_pad))
            out = F.pad(out, (0, self.ffn_pad))
        return F.linear(F.silu(F.linear(m, gate)) * F.linear(m, up), out)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, docs=None, attention=None,
                kv=None) -> torch.Tensor:
        """`attention`: another backend for this call (SDPA with the annealed mask in `docs`). `kv`: a KV
        cache's hook for this layer (pretrain/model/kv_cache.py): takes this window's k, v, returns the
        keys and values to attend to."""
        B, L, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(n).view(B, L, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(n).view(B, L, self.n_kv_heads, self.head_dim)
        if kv is not None:
            k, v = kv(k, v)
        h = x + self.attn_out((attention or self.attention)(q, k, v, docs).reshape(B, L, -1))
        return h + self.ffn(self.ff_norm(h))


def checkpoint_stride(spec: str | int) -> int:
    """trainer.activation_checkpointing -> k: every k-th block (0, k, 2k, ...) recomputes its
    activations in the backward; 0 = none, 1 = every block (`full`)."""
    spec = str(spec).strip().lower()
    if spec == "none":
        return 0
    if spec == "full":
        return 1
    if spec.isdigit() and int(spec) >= 1:
        return int(spec)
    raise ValueError(f"trainer.activation_checkpointing={spec!r} is not none, full or a positive integer k")


# The shortest trainer.seq_len accepted: the model fills masked tokens from the rest of the window, and a
# window of a few tokens holds less than a sentence of context (a 3-token run trained 461 steps on noise).
MIN_SEQ_LEN = 16


def check_config(m: ModelConfig, seq_len: int, activation_checkpointing: str | int) -> None:
    """The relations between model.* keys and the trainer keys the model reads, before any work (each
    key's own range: pretrain/domains.py, checked first)."""
    require(m.head_dim is not None or m.d_model % m.n_heads == 0,
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads} (set model.head_dim)")
    require(m.n_heads % m.n_kv_heads == 0,
            f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    require(m.head_size % 2 == 0, f"model head dim {m.head_size} must be even for RoPE")
    check_scaling(m.rope_scaling)
    check_moe(m)
    require(m.attention in ("auto", "sdpa", "flash"),
            f"model.attention={m.attention!r} is not one of auto, sdpa, flash")
    short = "" if seq_len >= MIN_SEQ_LEN else ": shorter windows hold too little context to learn from"
    require(MIN_SEQ_LEN <= seq_len <= m.max_sequence_length,
            f"trainer.seq_len={seq_len} is outside {MIN_SEQ_LEN}..model.max_sequence_length={m.max_sequence_length} "
            f"(model={m.name}){short}")
    try:
        checkpoint_stride(activation_checkpointing)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class WholeSequence:
    """The pass over whole sequences: the identity of a sequence-parallel shard (pretrain/engine/
    sequence_parallel.SequenceShard, which the training loop passes when cluster.sequence_parallel > 1:
    this rank's slice of the sequence, and attention wrapped in the all-to-all)."""

    def local(self, t: torch.Tensor, halves: int, dim: int = 1) -> torch.Tensor:
        return t

    def length(self, n: int) -> int:
        return n

    def attention(self, backend):
        return backend

    def gathered(self, docs, length: int, halves: int):
        return docs


WHOLE_SEQUENCE = WholeSequence()


class LLaDAModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.attention = select_attention(cfg.attention)
        self.block_attention = select_block_attention(cfg.attention)  # x_t with x_0 (block diffusion)
        self.transformer = nn.ModuleDict(dict(
            wte=Embedding(cfg.vocab_size, cfg.d_model, cfg.init_std),
            blocks=nn.ModuleList(Block(cfg, self.attention, i) for i in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            ff_out=OutputHead(cfg.d_model, cfg.vocab_size, cfg.init_std),  # untied output head
        ))
        if cfg.tie_embeddings:  # one parameter, named transformer.wte.weight (named_parameters lists it once)
            self.transformer.ff_out.weight = self.transformer.wte.weight
        self.checkpoint_every = 0
        # The training step, set by the loop; it picks the annealed mask (model.attention_anneal_steps).
        # None (evaluation and sampling outside training): bidirectional.
        self.step: int | None = None
        # (std, mask id), set by the loop from block.embedding_noise: in training, Gaussian noise of this std
        # on the masked tokens' embeddings (LLaDA 2.0's conversion from an AR model); None: off.
        self.embedding_noise: tuple[float, int] | None = None
        self._rope: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def set_activation_checkpointing(self, spec: str | int) -> None:
        self.checkpoint_every = checkpoint_stride(spec)

    def rope(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for this length on this device, computed once (not per forward, not per block)."""
        key = (seq_len, str(device))
        if key not in self._rope:
            with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable by autograd later
                self._rope[key] = rope_tables(seq_len, self.cfg.rotary_dim, self.cfg.rope_theta, device,
                                              self.cfg.rope_scaling)
        return self._rope[key]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(ids)
        if self.embedding_noise is not None and self.training:  # the global RNG: saved with the checkpoint
            std, mask_id = self.embedding_noise
            x = x + (ids == mask_id)[..., None].to(x.dtype) * std * torch.randn_like(x)
        return x

    def hidden(self, input_ids: torch.Tensor, doc_start: torch.Tensor | None = None,
               clean_ids: torch.Tensor | None = None, block_size: int | None = None,
               attention_mask: torch.Tensor | None = None, cache: KVCache | BlockKVCache | None = None,
               shard=WHOLE_SEQUENCE) -> torch.Tensor:
        """input_ids [B, L] -> the last block's output [B, L, d] (before the final norm). With `clean_ids`
        [B, L] (block diffusion, pretrain/model/block_attention.py): one pass over input_ids followed by
        clean_ids, both at positions 0..L-1, under the block mask of `block_size`; the noisy half's output.
        Sampling only: `attention_mask` [B, L_all] (True or 1 = a token, 0 = padding no one attends to);
        `cache`: the input is the cache's window of a sequence of length L_all (pretrain/model/kv_cache.py).
        `shard` (training under sequence parallelism): the blocks run on this rank's slice of the sequence
        (of each half of the block pass) and return it: [B, L / N, d]; the masks stay whole-sequence."""
        if cache is not None and (cache.mode == "block") != (block_size is not None):
            raise ValueError(f"cache={cache.mode} does not serve this pass (block_size={block_size}): "
                             "kv_cache.make_cache picks the cache of a model")
        t = self.transformer
        L = input_ids.shape[1]
        cos, sin = self.rope(L if cache is None else cache.length, input_ids.device)
        if cache is not None:
            cos, sin = cache.positions(cos, sin)
        attention = None
        if clean_ids is not None:
            x = self.embed(torch.cat([input_ids, clean_ids], dim=1))
            cos, sin = torch.cat([cos, cos]), torch.cat([sin, sin])
            attention = self.block_attention
            docs = attention.mask(L, block_size, input_ids.device, doc_start)
        elif block_size is not None:  # the served block model over one sequence: block causal (dense, SDPA)
            x = self.embed(input_ids)
            attention = sdpa_attention
            docs = (block_causal(L, block_size, input_ids.device)[None, None] if cache is None
                    else cache.mask(input_ids.device))
            if doc_start is not None:
                docs = docs & sdpa_attention.documents(doc_start)
        else:
            x = self.embed(input_ids)
            docs = self.attention.documents(doc_start) if doc_start is not None else None
            mask = None if self.step is None else annealed_mask(L, self.step, self.cfg.attention_anneal_steps,
                                                                input_ids.device)
            if mask is not None:  # annealing: a dense mask, which only SDPA takes (with the documents' mask, if any)
                attention = sdpa_attention
                docs = mask if doc_start is None else sdpa_attention.documents(doc_start) & mask
        if attention_mask is not None:  # padding (sampling): keys no query attends to, a dense mask for SDPA
            keys = attention_mask.bool()[:, None, None, :]
            if attention is None:  # the plain path's documents, in SDPA's form
                docs = None if doc_start is None else sdpa_attention.documents(doc_start)
            attention = sdpa_attention
            docs = keys if docs is None else docs & keys
        halves = 1 if clean_ids is None else 2
        n_all = x.shape[1]
        x, cos, sin = shard.local(x, halves), shard.local(cos, halves, dim=0), shard.local(sin, halves, dim=0)
        docs = shard.gathered(docs, n_all, halves)
        attention = shard.attention(attention or self.attention)
        k = self.checkpoint_every
        for i, block in enumerate(t.blocks):
            if k and i % k == 0 and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, docs, attention, use_reentrant=False)
            else:
                x = block(x, cos, sin, docs, attention, None if cache is None else cache.layer(i))
        return x[:, :shard.length(L)]

    def forward(self, input_ids: torch.Tensor, doc_start: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, masked: torch.Tensor | None = None,
                clean_ids: torch.Tensor | None = None, block_size: int | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | BlockKVCache | None = None,
                shard=WHOLE_SEQUENCE):
        """input_ids [B, L] -> logits [B, L, vocab]. No time input: the mask ratio is read off the input.
        With `targets` [B, L] and `masked` [B, L] bool (training): the head and cross-entropy on the
        masked positions only -> (cross-entropy, argmax == target), one per masked position in
        row-major order (the order of `logits[masked]`); the full logits never exist.
        `doc_start` [B, L] bool: attend only within each document (model.document_mask).
        `clean_ids` [B, L] and `block_size`: block diffusion's x_t-with-x_0 pass (`hidden`).
        `attention_mask`, `cache`: sampling (see `hidden`). `shard` (sequence parallelism, training): the
        head runs on this rank's slice of the rows, and `targets` and `masked` are sliced the same way.
        """
        t = self.transformer
        x = self.hidden(input_ids, doc_start, clean_ids, block_size, attention_mask, cache, shard)
        if self.cfg.shift_prediction:
            x = shift_hidden(x)
        if targets is None:
            return t.ff_out(t.ln_f(x))
        masked, targets = shard.local(masked, 1), shard.local(targets, 1)
        return t.ff_out(t.ln_f(x[masked]), targets[masked])


def shift_hidden(x: torch.Tensor) -> torch.Tensor:
    """Dream's shifted prediction (Ye et al., 2025, "Dream 7B"): the output at position i is the
    source model's prediction for i + 1, so position i is predicted from the output at i - 1 (position 0
    from its own). As logits: cat([raw[:, :1], raw[:, :-1]], dim=1). The loss and the sampler read these
    shifted outputs; the masked positions and targets stay where they are."""
    return torch.cat([x[:, :1], x[:, :-1]], dim=1)


def compile_blocks(model: LLaDAModel, backend: str = "inductor") -> None:
    """Regional torch.compile: each block's forward is compiled (the blocks share one graph, since
    they are alike), which fuses the elementwise work around the matmuls (RMSNorm and RoPE in fp32,
    SwiGLU, dtype casts). Module hooks (ZeRO-3's) stay outside the compiled region. The training
    loss's elementwise work is compiled too (OutputHead.compile_loss)."""
    for block in model.transformer.blocks:
        block.forward = torch.compile(block.forward, backend=backend)
    model.transformer.ff_out.compile_loss(backend)


def count_params(model: nn.Module) -> dict[str, int]:
    """Total parameters and non-embedding parameters (without the input embedding and output head,
    as the LLaDA paper counts them for its 6ND FLOPs)."""
    def numel(p):  # ZeRO-3 leaves an empty placeholder in place of each partitioned parameter
        return getattr(p, "ds_numel", p.numel())

    cfg, m = model.cfg, model.cfg.moe
    routed = cfg.layer_expert_params * cfg.moe_layers  # from the config: under AutoEP a rank holds only its own
    total = routed + sum(numel(p) for name, p in model.named_parameters() if ".moe.experts." not in name)
    embeddings = {id(p): p for p in (model.transformer.wte.weight, model.transformer.ff_out.weight)}  # once if tied
    embedding = sum(numel(p) for p in embeddings.values())
    idle = routed * (m.num_experts - m.top_k) // m.num_experts if m else 0  # all but the top_k a token uses
    return {"params": total, "non_embedding_params": total - embedding,
            "active_params": total - idle, "active_non_embedding_params": total - embedding - idle}
