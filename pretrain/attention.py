"""Bidirectional attention backends, chosen once at model construction.

Every backend takes q [B, L, H, D] and k, v [B, L, H_kv, D] and returns [B, L, H, D]. There is no
causal mask: LLaDA attends to the whole sequence. flash-attn is imported only when asked for, so the
package works where it cannot be installed (CPU machines); torch SDPA is the fallback everywhere.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups = q.shape[2] // k.shape[2]
    if groups > 1:  # grouped-query attention: each kv head serves `groups` query heads
        k = k.repeat_interleave(groups, dim=2)
        v = v.repeat_interleave(groups, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False)
    return out.transpose(1, 2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func  # lazy: only present on GPU installs ([gpu] extra)

    return flash_attn_func(q, k, v, causal=False)  # handles grouped kv heads natively


def flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def select_attention(name: str) -> AttentionFn:
    """`auto` picks flash-attn when it can run here, else SDPA; `flash` insists on flash-attn."""
    if name == "sdpa":
        return sdpa_attention
    if name == "flash":
        if not flash_available():
            raise RuntimeError("model.attention=flash needs CUDA and the flash-attn package "
                               "(pip install 'llada-pretrain[gpu]'); use model.attention=sdpa or auto")
        return flash_attention
    if name == "auto":
        return flash_attention if flash_available() else sdpa_attention
    raise ValueError(f"model.attention={name!r} is not one of auto, sdpa, flash")
