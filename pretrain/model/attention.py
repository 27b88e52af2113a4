"""Bidirectional attention backends, chosen once at model construction.

Every backend takes q [B, L, H, D] and k, v [B, L, H_kv, D] and returns [B, L, H, D]. There is no
causal mask: LLaDA attends to the whole sequence. flash-attn is imported only when asked for, so the
package works where it cannot be installed (CPU machines); torch SDPA is the fallback everywhere.

Document masking (`model.document_mask=true`): a packed window holds pieces of several documents,
and each token then attends only within its own document. The model turns the window's document
starts into the backend's form once per forward (`backend.documents(doc_start)`), and every block
reuses it: SDPA takes a block-diagonal boolean mask [B, 1, L, L]; flash-attn's varlen kernel takes
the documents' boundaries in the flattened batch (cu_seqlens) and never builds an L x L mask.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# torch >= 2.5: SDPA serves grouped kv heads itself; before that the kv heads are repeated.
SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # a builtin: no signature


def segment_ids(doc_start: torch.Tensor) -> torch.Tensor:
    """doc_start [B, L] bool (True where a document begins) -> [B, L] int: the document of each token
    within its row. A row's first token opens a segment whether or not a document starts there."""
    return doc_start.long().cumsum(dim=1) - doc_start[:, :1].long()


class SDPAAttention:
    def documents(self, doc_start: torch.Tensor) -> torch.Tensor:
        seg = segment_ids(doc_start)
        return (seg[:, :, None] == seg[:, None, :])[:, None]  # [B, 1, L, L]: True = may attend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor | None = None):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        groups = q.shape[1] // k.shape[1]
        if groups > 1 and not SDPA_HAS_GQA:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = {"enable_gqa": True} if groups > 1 and SDPA_HAS_GQA else {}
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=docs, is_causal=False, **extra)
        return out.transpose(1, 2)


@dataclass
class VarlenDocs:
    cu_seqlens: torch.Tensor  # int32 [n_docs + 1]: where each document starts in the flattened B * L tokens
    max_len: int


class FlashAttention:
    def documents(self, doc_start: torch.Tensor) -> VarlenDocs:
        B, L = doc_start.shape
        starts = doc_start.clone()
        starts[:, 0] = True  # every row opens a document: documents never span two rows
        flat = starts.flatten().nonzero().flatten()
        cu = torch.cat([flat, flat.new_tensor([B * L])]).to(torch.int32)
        return VarlenDocs(cu, int((cu[1:] - cu[:-1]).max()))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: VarlenDocs | None = None):
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # lazy: only on GPU installs ([gpu] extra)

        if docs is None:
            return flash_attn_func(q, k, v, causal=False)  # handles grouped kv heads natively
        B, L = q.shape[:2]
        out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), docs.cu_seqlens,
                                     docs.cu_seqlens, docs.max_len, docs.max_len, causal=False)
        return out.view(B, L, *out.shape[1:])


sdpa_attention = SDPAAttention()
flash_attention = FlashAttention()


def flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def select_attention(name: str) -> SDPAAttention | FlashAttention:
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
