"""Block diffusion's training side: the block size at each step, the times per block, and the checks.
Pure torch. The attention is pretrain/model/block_attention.py; the masking and loss are
diffusion.py's, with one t per block (BD3LM, arXiv 2503.09573) or per sequence (dFactory).

The block size over a run (`block.schedule`, LLaDA 2.0's warmup-stable-decay) is a step function of
[position, size] points positioned like the lr schedule (steps, tokens or fractions of the run): a
step trains with the size of the last point at or before it, so the size changes only between steps
and is a function of the step alone (a resume continues the schedule where it stood). A size equal
to the sequence length is LLaDA's objective, taken on LLaDA's path (no clean half).
"""

from __future__ import annotations

import torch

from pretrain.config import BlockConfig, MaskConfig, ModelConfig, require
from pretrain.engine.lr_schedule import UNITS, step_to_position
from pretrain.objective.diffusion import sample_times

NOISE = ("block", "sequence")
WEIGHTS = ("elbo", "none")


def block_size_at(b: BlockConfig, seq_len: int, step: int, tokens_per_step: int, last_step: int) -> int:
    """The block size that step `step` (0-based: the step being trained) uses; seq_len = no blocks."""
    if b.schedule is None:
        return b.size or seq_len
    position = step_to_position(step, b.schedule.unit, tokens_per_step, last_step)
    size = b.schedule.points[0][1]
    for at, value in b.schedule.points:
        if float(at) <= position:
            size = value
    return int(size)


def inference_block_size(b: BlockConfig, seq_len: int, tokens_per_step: int, last_step: int) -> int | None:
    """The size the trained model serves with (saved in the export): the one of the run's last step;
    None when that is the whole sequence (a plain LLaDA model)."""
    size = block_size_at(b, seq_len, max(last_step - 1, 0), tokens_per_step, last_step)
    return None if size >= seq_len else size


def pass_block_size(size: int, length: int) -> int | None:
    """What the model's pass gets: None (LLaDA's pass over x_t alone) when one block spans the batch."""
    return None if size >= length else size


def all_sizes(b: BlockConfig, seq_len: int) -> list[int]:
    if b.schedule is None:
        return [b.size or seq_len]
    return [int(p[1]) for p in b.schedule.points]


def block_times(method: str, n_global: int, first: int, n: int, n_blocks: int, eps: float,
                generator: torch.Generator, high: float = 1.0) -> torch.Tensor:
    """[n, n_blocks] times for sequences first..first+n-1 of the global batch: the global batch's
    n_global x n_blocks times drawn as one set by `method` (stratified across every block of the step)."""
    t = sample_times(method, n_global * n_blocks, first * n_blocks, n * n_blocks, eps, generator, high)
    return t.view(n, n_blocks)


def check_config(b: BlockConfig, m: ModelConfig, mask: MaskConfig, seq_len: int) -> None:
    """block.*, and what block diffusion cannot be combined with, before any work."""
    require(b.noise in NOISE, f"block.noise={b.noise!r} is not one of {', '.join(NOISE)}")
    require(b.weight in WEIGHTS, f"block.weight={b.weight!r} is not one of {', '.join(WEIGHTS)}")
    require(b.embedding_noise >= 0, f"block.embedding_noise={b.embedding_noise} must be >= 0")
    if b.schedule is not None:
        s = b.schedule
        require(b.size is None,
                f"block.size={b.size} is set with block.schedule: the schedule decides, set block.size=null")
        require(s.unit in UNITS, f"block.schedule.unit={s.unit!r} is not one of {', '.join(UNITS)}")
        pts = s.points
        require(len(pts) > 0 and all(isinstance(p, list) and len(p) == 2 for p in pts),
                f"block.schedule.points={pts} must be a non-empty list of [position, block size]")
        require([p[0] for p in pts] == sorted(p[0] for p in pts),
                f"block.schedule.points={pts}: positions must not decrease")
        require(s.unit != "fraction" or all(0 <= p[0] <= 1 for p in pts),
                f"block.schedule.points={pts}: with block.schedule.unit=fraction positions are in [0, 1]")
    for size in all_sizes(b, seq_len):
        require(isinstance(size, int) and 0 < size <= seq_len and seq_len % size == 0,
                f"block size {size} (block.size / block.schedule) does not divide trainer.seq_len={seq_len}")
    if min(all_sizes(b, seq_len)) < seq_len:
        require(m.attention_anneal_steps == 0,
                f"model.attention_anneal_steps={m.attention_anneal_steps} with block diffusion: the block schedule "
                f"(from block 1, causal) is the route from an AR model; set it to 0")
        require(not m.shift_prediction, "model.shift_prediction=true with block diffusion: a block's first token would "
                                        "be predicted from the block before, which it cannot see; set it to false")
        require(m.attention != "flash", "model.attention=flash with block diffusion: flash-attn has no block mask; "
                                        "use auto (FlexAttention on CUDA) or sdpa")
        require(not mask.conditional, "mask.conditional=true with block diffusion is not supported")
