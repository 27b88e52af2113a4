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

A block-causal model (block diffusion) makes a cache exact: a block never sees a later one, so the
keys and values of a committed block are final once computed (`BlockKVCache`, "block"). It keeps them
across blocks and computes each committed block once: every pass runs over the blocks not yet cached
(the block being decoded, and at its first pass the blocks committed since), attending to the cached
keys and its own under the block-causal mask. Cached and uncached sampling give the same tokens.

`make_cache(name, block_size)` picks the one cache that serves a model, and refuses the others in one
line: prefix and dual for full-attention models, block for block diffusion models.
"""

from __future__ import annotations

import torch

CACHES = ("prefix", "dual", "block")


def make_cache(name: str | None, block_size: int | None):
    """A fresh cache for one generate call (None for "none" or None); raises ValueError naming the
    cache that would serve this model instead."""
    if name in (None, "none"):
        return None
    if name not in CACHES:
        raise ValueError(f"cache={name!r} is not one of none, {', '.join(CACHES)}")
    if block_size and name != "block":
        raise ValueError(f"cache={name}: this is a block diffusion model (block size {block_size}); its cache is "
                         "cache=block (exact) or none")
    if not block_size and name == "block":
        raise ValueError("cache=block is the exact cache of block diffusion models; this model attends to the "
                         "whole sequence: use cache=prefix or dual (approximate) or none")
    return BlockKVCache(block_size) if name == "block" else KVCache(name)


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


class BlockKVCache:
    """The exact cache of a block-causal model: every layer's keys and values [B, done, H_kv, D] of the
    sequence's first `done` positions, whole blocks that no later token can change."""

    mode = "block"

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0
        self.start = 0  # the pass computes positions start..length-1 (start = what is cached)
        self.keep = 0  # ... and caches its first keep - start of them

    @property
    def done(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def reset(self, length: int) -> tuple[int, int]:
        """A block's first pass over a sequence of `length` (its last block the one being decoded): the
        blocks before that one are committed, and this pass caches those not cached yet."""
        if length < self.done:
            raise ValueError(f"the sequence ({length} tokens) is shorter than the cached {self.done}: one cache "
                             "serves one growing sequence")
        self.length, self.start = length, self.done
        self.keep = (length - 1) // self.block_size * self.block_size
        return self.start, length

    def window(self, block_start: int, block_end: int) -> tuple[int, int]:
        """The block's later passes: the same window minus what the first one cached."""
        self.start = self.keep = self.done
        return self.start, self.length

    def mask(self, device) -> torch.Tensor:
        """[1, 1, window, length] bool: a block sees itself and the blocks before it."""
        block = torch.arange(self.length, device=device) // self.block_size
        return (block[self.start:, None] >= block[None, :])[None, None]

    def layer(self, i: int):
        def attend(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if len(self.keys) == i:  # the first pass of all: nothing cached yet
                self.keys.append(k[:, :0])
                self.values.append(v[:, :0])
            k, v = torch.cat([self.keys[i], k], dim=1), torch.cat([self.values[i], v], dim=1)
            if self.keep > self.keys[i].shape[1]:  # blocks committed since the last pass: cached once
                self.keys[i], self.values[i] = k[:, : self.keep].clone(), v[:, : self.keep].clone()
            return k, v

        return attend

    def positions(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cos[self.start: self.length], sin[self.start: self.length]
