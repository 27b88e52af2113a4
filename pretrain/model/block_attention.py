"""Block diffusion's attention over x_t followed by x_0 (BD3LM, arXiv 2503.09573; LLaDA 2.0's Eq. 3).

The model runs on 2L tokens: the noisy sequence x_t at positions 0..L-1 and the clean x_0 after it,
both at RoPE positions 0..L-1. With blocks of B tokens (block of position p: (p mod L) // B):
  - a noisy token sees the noisy tokens of its own block (block diagonal) and the clean tokens of the
    blocks before its own (offset block causal);
  - a clean token sees the clean tokens of its own block and of the blocks before (block causal);
  - nothing outside a noisy block sees it, so one pass trains every block as if it were the next one
    to be generated after the clean blocks before it.
Intersected with the document mask (model.document_mask): a token sees only its own document.

Two backends, picked once at model construction (`select_block_attention`):
  - `SDPABlockAttention`: the dense boolean mask [B, 1, 2L, 2L] through torch SDPA. The CPU path
    (flex_attention has no backward on the CPU) and the reference.
  - `FlexBlockAttention`: torch FlexAttention with a BlockMask, on CUDA. BLOCK_SIZE is passed
    explicitly (bd3lms issue 23: without it, create_block_mask's default tile silently builds a mask
    for another tiling), and the tile divides 2L.
"""

from __future__ import annotations

import torch

from pretrain.model.attention import sdpa_attention, segment_ids


def may_attend(q: torch.Tensor, kv: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """True where position q of the 2L sequence may attend to kv (broadcasting integer tensors)."""
    q_noisy, kv_noisy = q < seq_len, kv < seq_len
    q_block, kv_block = (q % seq_len) // block_size, (kv % seq_len) // block_size
    same_noisy_block = q_noisy & kv_noisy & (q_block == kv_block)
    noisy_sees_clean = q_noisy & ~kv_noisy & (kv_block < q_block)
    clean_sees_clean = ~q_noisy & ~kv_noisy & (kv_block <= q_block)
    return same_noisy_block | noisy_sees_clean | clean_sees_clean


def block_causal(seq_len: int, block_size: int, device) -> torch.Tensor:
    """[L, L] bool: the served model's attention over one sequence (sampling, likelihood of a prefix):
    a block sees itself and the blocks before it. The block being decoded sees the clean blocks before
    it as the noisy half does in training; the clean blocks see what they saw in the clean half."""
    block = torch.arange(seq_len, device=device) // block_size
    return block[:, None] >= block[None, :]


def doubled_segments(doc_start: torch.Tensor) -> torch.Tensor:
    """[B, L] document starts -> [B, 2L] document ids: the clean half repeats the noisy half's."""
    seg = segment_ids(doc_start)
    return torch.cat([seg, seg], dim=1)


class SDPABlockAttention:
    def __init__(self):
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def mask(self, seq_len: int, block_size: int, device, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """[1 or B, 1, 2L, 2L] bool, True = may attend."""
        key = (seq_len, block_size, str(device))
        if key not in self._cache:
            pos = torch.arange(2 * seq_len, device=device)
            self._cache[key] = may_attend(pos[:, None], pos[None, :], seq_len, block_size)[None, None]
        dense = self._cache[key]
        if doc_start is None:
            return dense
        seg = doubled_segments(doc_start.to(device))
        return dense & (seg[:, :, None] == seg[:, None, :])[:, None]

    def __call__(self, q, k, v, mask):
        return sdpa_attention(q, k, v, mask)


def flex_tile(length: int, largest: int = 128) -> int:
    """The largest power of two <= `largest` that divides `length`: the BlockMask's tile."""
    tile = largest
    while length % tile:
        tile //= 2
    return tile


class FlexBlockAttention:
    def __init__(self, compiled: bool):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.create_block_mask = create_block_mask
        self.flex = torch.compile(flex_attention) if compiled else flex_attention
        self._cache: dict[tuple[int, int, str], object] = {}

    def mask(self, seq_len: int, block_size: int, device, doc_start: torch.Tensor | None = None,
             order: torch.Tensor | None = None):
        """`order` (sequence parallelism, pretrain/engine/sequence_parallel.py): the pass's tokens arrive in
        another order, order[i] being the position in the pass of token i; the mask is built in that order
        (a BlockMask cannot be permuted afterwards, as a dense mask can)."""
        key = (seq_len, block_size, str(device), order is not None)
        if doc_start is None and key in self._cache:
            return self._cache[key]
        n = 2 * seq_len
        place = (lambda i: i) if order is None else (lambda i: order[i])  # noqa: E731
        if doc_start is None:
            def mask_mod(b, h, q, kv):
                return may_attend(place(q), place(kv), seq_len, block_size)
            batch = None
        else:
            seg = doubled_segments(doc_start.to(device))

            def mask_mod(b, h, q, kv):
                q, kv = place(q), place(kv)
                return may_attend(q, kv, seq_len, block_size) & (seg[b, q] == seg[b, kv])
            batch = seg.shape[0]
        block_mask = self.create_block_mask(mask_mod, batch, None, n, n, device=device, BLOCK_SIZE=flex_tile(n))
        if doc_start is None:
            self._cache[key] = block_mask
        return block_mask

    def __call__(self, q, k, v, block_mask):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = self.flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)


def select_block_attention(attention: str) -> SDPABlockAttention | FlexBlockAttention:
    """FlexAttention where it trains (CUDA, compiled), else the dense mask through SDPA.
    model.attention=sdpa keeps SDPA everywhere (block models refuse model.attention=flash at start)."""
    if attention != "sdpa" and torch.cuda.is_available():
        return FlexBlockAttention(compiled=True)
    return SDPABlockAttention()
