"""Key/value caches for sampling: Fast-dLLM's prefix and dual caches (Wu et al., arXiv 2505.22618).

Pure torch, importing nothing else: every export ships this file as kv_cache_llada.py beside its
modeling code (pretrain/hf/modeling/), whose model takes the same object.

The sampler (pretrain/objective/sampler.py) decodes the answer block by block. At a block's first step
the model runs over the whole sequence and every layer stores its keys and values (after RoPE) here
(`reset`, then a pass that fills). At the block's later steps the model runs only over a window of the
sequence (`window`): its queries, keys and values are computed afresh, written over the cached ones,
and its queries attend to the cached keys of the rest.

- prefix: the window is the current block and everything after it; the prefix (prompt and committed
  blocks) is read from the cache.
- dual: the window is the current block alone; the prefix and the masked blocks after it are read from
  the cache.
(Either window also takes the one position before the block, for models with shifted prediction.)

For LLaDA's bidirectional attention both are approximations: the prefix's keys depend on the tokens
after it, which change within a block; the cache is refreshed at each block. docs/fast_sampling.md
gives the measured effect on the output.

A block-causal model (block diffusion) makes a cache exact: a committed block never sees a later one,
so its keys and values are final once computed. That cache is this class with `key_end` set to the
window's end (the current block sees the committed blocks and itself, nothing after it) and the
committed block's keys kept between blocks instead of refilled (see docs/fast_sampling.md).
"""

from __future__ import annotations

import torch

CACHES = ("prefix", "dual")


class KVCache:
    """Every layer's keys and values [B, L, H_kv, D] for the whole sequence of length L."""

    def __init__(self, mode: str):
        if mode not in CACHES:
            raise ValueError(f"cache={mode!r} is not one of {', '.join(CACHES)} (or none)")
        self.mode = mode
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0
        self.start, self.end = 0, 0  # the window the next pass computes: positions start..end-1
        self.key_end = 0  # its queries attend to keys 0..key_end-1

    def reset(self, length: int) -> tuple[int, int]:
        """The next pass runs over the whole sequence and fills the cache."""
        self.keys, self.values, self.length = [], [], length
        self.start, self.end, self.key_end = 0, length, length
        return self.start, self.end

    def window(self, block_start: int, block_end: int) -> tuple[int, int]:
        """The next pass runs over the window that the mode recomputes for this block; returns it. It
        starts one position before the block: a model with shifted prediction (Dream's, the demo's)
        reads the block's first logits off that position."""
        self.start, self.end = max(block_start - 1, 0), block_end if self.mode == "dual" else self.length
        self.key_end = self.length
        return self.start, self.end

    def layer(self, i: int):
        """The hook layer i calls with its fresh k, v [B, end - start, H_kv, D]; returns the keys and
        values its queries attend to."""
        def attend(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if len(self.keys) == i:  # the filling pass
                self.keys.append(k)
                self.values.append(v)
                return k, v
            self.keys[i][:, self.start: self.end] = k
            self.values[i][:, self.start: self.end] = v
            return self.keys[i][:, : self.key_end], self.values[i][:, : self.key_end]

        return attend

    def positions(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of the whole sequence [L, D] -> the window's rows."""
        return cos[self.start: self.end], sin[self.start: self.end]
