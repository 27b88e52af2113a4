"""Ulysses sequence parallelism: `cluster.sequence_parallel: N` splits each training sequence across N ranks.

The world is cut into groups of N consecutive ranks (DeepSpeed's parallel_state_sp layout: ranks
g*N .. g*N+N-1 form group g). The ranks of a group read the same sequences (the data stream's rank
and size are the data-parallel ones, `Layout.dp_rank` / `dp_size` = world / N) and each runs the
blocks on its slice of every sequence. Around attention DeepSpeed's `DistributedAttention` swaps the
sequence slice for a slice of the heads by all-to-all, so the local attention sees whole sequences
(and the whole-sequence masks: documents, block diffusion) for H / N heads; after it the swap goes
back. ZeRO-3 shards over the whole world and reduces gradients over it, dividing by world / N: each
rank's loss is its slice's share of the group's loss (normalised by the whole sequences' counts),
so the group's gradients add up to the unsplit sequence's, and the average runs over the
data-parallel ranks only. DeepSpeed learns the groups from the `mpu` object (its
parallel_state_sp module) passed to zero.Init and deepspeed.initialize.

Only the training pass is split (`SequenceShard`, passed to the model's forward by the loop);
evaluation and sampling run the whole sequences on every rank of a group, which costs N-fold work
there but needs no length that N divides.

`check_config` refuses what cannot be split, in one line each, before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pretrain.config import RunConfig, require


def check_config(run: RunConfig, world_size: int) -> None:
    """cluster.sequence_parallel against the world, the heads and the sequence (MoE: engine/expert_parallel.py)."""
    n, m, t = run.cluster.sequence_parallel, run.model, run.trainer
    if n == 1:
        return
    key = f"cluster.sequence_parallel={n}"
    require(world_size % n == 0, f"{key} does not divide the world size {world_size}: each group of {n} ranks splits "
                                 f"its sequences, so the world must be whole groups")
    # DistributedAttention hands each rank of a group 1/N of the heads: the kv heads first (a query
    # head must land on the rank that holds its kv head), so both counts must split evenly.
    require(m.n_heads % n == 0, f"{key} does not divide model.n_heads={m.n_heads} (model={m.name}): each rank of a "
                                f"group attends with 1/{n} of the heads")
    require(m.n_kv_heads % n == 0, f"{key} does not divide model.n_kv_heads={m.n_kv_heads} (model={m.name}): "
                                   f"each rank of a group attends with 1/{n} of the key/value heads")
    require(t.seq_len % n == 0, f"{key} does not divide trainer.seq_len={t.seq_len}: each rank holds 1/{n} of every "
                                f"sequence (block diffusion: of x_t and of x_0 each)")
    require(not m.shift_prediction, f"{key} with model.shift_prediction=true: the shift would cross the ranks' "
                                    f"slices; set cluster.sequence_parallel=1")
    dp, per_step = world_size // n, t.micro_batch_size * (world_size // n)
    require(t.global_batch_size % per_step == 0,
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by trainer.micro_batch_size="
            f"{t.micro_batch_size} x {dp} data-parallel ranks (world size {world_size} / {key}) = {per_step}")
    zero = (run.deepspeed or {}).get("zero_optimization") or {}
    require(zero.get("stage", 0) == 3, f"{key} needs ZeRO stage 3 (deepspeed.zero_optimization.stage="
                                       f"{zero.get('stage', 0)}): the gradient scaling (SequenceShard.loss_scale) "
                                       f"follows ZeRO-3's reduction")
    require(zero.get("reduce_scatter", True) is not False,
            f"{key} with deepspeed.zero_optimization.reduce_scatter=false: the gradient scaling "
            f"(SequenceShard.loss_scale) follows the reduce-scatter path; remove the setting")


def data_parallel_size(run: RunConfig, world_size: int) -> int:
    """The ranks that read different sequences: the batch math (accumulation steps) and the gradient average."""
    return world_size // run.cluster.sequence_parallel


@dataclass(frozen=True)
class Layout:
    """Where a rank stands: its group of N (sp_rank within it) and the group's data-parallel place."""
    size: int  # N
    sp_rank: int
    dp_rank: int
    dp_size: int

    @classmethod
    def of(cls, run: RunConfig, rank: int, world: int) -> Layout:
        n = run.cluster.sequence_parallel
        return cls(n, rank % n, rank // n, world // n)


def init_groups(size: int):
    """DeepSpeed's sequence-parallel groups (once per process: a sweep's later jobs reuse them), as the
    `mpu` that zero.Init and deepspeed.initialize take; None when nothing is split."""
    if size == 1:
        return None
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(size)
    return mpu


class UlyssesAttention:
    """A local attention backend (q [B, L, H, D], k, v [B, L, H_kv, D], masks of the whole sequence) run
    on slices [B, L / N, ...]: DeepSpeed's all-to-all scatters the heads (dim 2) and gathers the
    sequence (dim 1) before it, and the reverse after."""

    def __init__(self, local, group):
        from deepspeed.sequence.layer import DistributedAttention

        self.local = local
        self.layer = DistributedAttention(local, group, scatter_idx=2, gather_idx=1)

    def __call__(self, q, k, v, docs=None):
        return self.layer(q, k, v, 0, None, docs)  # batch first; no rotary here (applied before, per position)


def gathered_order(length: int, halves: int, size: int, device) -> torch.Tensor:
    """The position in the whole pass of each token of the gathered sequence: the all-to-all gathers the
    ranks' slices in rank order, each rank's slice being its part of every half."""
    parts = torch.arange(length, device=device).chunk(halves)
    return torch.cat([torch.cat([p.chunk(size)[r] for p in parts]) for r in range(size)])


class SequenceShard:
    """This rank's slice of each sequence in the training pass (LLaDAModel.hidden calls it).

    A pass over `halves` parts (block diffusion: x_t then x_0, each of length L) keeps its slice of
    each part: tokens [r L/N, (r+1) L/N) of x_t and the same of x_0, with their RoPE positions, so every
    rank has both a noisy and a clean slice and the masked rows spread evenly. The all-to-all then
    gathers the ranks' slices in rank order, [x_t 0, x_0 0, x_t 1, x_0 1, ...], so the whole-pass mask
    is permuted into that order (`gathered`); one part needs no permutation."""

    def __init__(self, group, size: int, rank: int, backends):
        self.group, self.size, self.rank = group, size, rank
        # What each rank's loss is multiplied by for the backward. DeepSpeed 0.19.8's ZeRO-3 reduce-scatter
        # (runtime/comm/coalesced_collectives.reduce_scatter_coalesced, the path taken with reduce_scatter
        # on, its default) divides the summed gradients by the whole world, not by world / N as its
        # other paths do: each slice's gradient would count 1/N. Measured: SP 2 logged half SP 1's
        # gradient norm before this factor, and the same after it (tests/pretrain/engine/test_sequence_parallel.py).
        self.loss_scale = size
        self.wrappers = {id(b): UlyssesAttention(b, group) for b in backends}  # built once, at setup
        self._orders: dict[tuple[int, int, str], torch.Tensor] = {}

    def local(self, t: torch.Tensor, halves: int, dim: int = 1) -> torch.Tensor:
        parts = t.chunk(halves, dim)
        return torch.cat([p.chunk(self.size, dim)[self.rank] for p in parts], dim)

    def length(self, n: int) -> int:
        return n // self.size

    def attention(self, backend):
        return self.wrappers[id(backend)]

    def order(self, length: int, halves: int, device) -> torch.Tensor:
        key = (length, halves, str(device))
        if key not in self._orders:
            self._orders[key] = gathered_order(length, halves, self.size, device)
        return self._orders[key]

    def gathered(self, docs, length: int, halves: int):
        """A dense mask [.., length, length] of the whole pass, in the gathered order (None passes, and so
        does a FlexAttention BlockMask: GatheredFlexAttention built it in that order)."""
        if docs is None or halves == 1 or not isinstance(docs, torch.Tensor):
            return docs
        o = self.order(length, halves, docs.device)
        return docs.index_select(-2, o).index_select(-1, o)


class GatheredFlexAttention:
    """The block pass's FlexAttention under SP: its BlockMask is built in the gathered order (a BlockMask
    cannot be permuted afterwards, as SequenceShard.gathered permutes a dense mask)."""

    def __init__(self, flex, size: int):
        self.flex, self.size = flex, size

    def mask(self, seq_len: int, block_size: int, device, doc_start: torch.Tensor | None = None):
        order = gathered_order(2 * seq_len, 2, self.size, device)
        return self.flex.mask(seq_len, block_size, device, doc_start, order=order)

    def __call__(self, q, k, v, block_mask):
        return self.flex(q, k, v, block_mask)


def make_shard(model, layout: Layout) -> SequenceShard | None:
    """The training pass's shard for this rank (None: SP 1). The block pass keeps its backend: a dense
    mask (SDPA) is permuted into the gathered order, FlexAttention's BlockMask is built in it."""
    if layout.size == 1:
        return None
    from pretrain.model.attention import sdpa_attention
    from pretrain.model.block_attention import FlexBlockAttention

    group = init_groups(layout.size).get_sequence_parallel_group()
    if isinstance(model.block_attention, FlexBlockAttention):
        model.block_attention = GatheredFlexAttention(model.block_attention, layout.size)
    return SequenceShard(group, layout.size, layout.sp_rank, (model.attention, model.block_attention, sdpa_attention))


def add_up(shard: SequenceShard | None, loss: torch.Tensor, stats):
    """The group's loss and per-sequence statistics (detached) from each rank's slice of them: what the
    metrics log, the same on every rank of the group (one all-reduce). Nothing to add without a shard."""
    if shard is None:
        return loss, stats
    import torch.distributed as dist

    fields = (stats.masked, stats.ce_sum, stats.weighted_sum, stats.correct)
    packed = torch.cat([loss.detach().float().reshape(1), *(f.float() for f in fields)])
    dist.all_reduce(packed, group=shard.group)
    masked, ce_sum, weighted_sum, correct = packed[1:].chunk(4)
    return packed[0], dataclasses.replace(stats, masked=masked, ce_sum=ce_sum, weighted_sum=weighted_sum,
                                          correct=correct)


def saved_size(saved_config: dict) -> int:
    """The sequence-parallel size a checkpoint was trained with (1 before the key existed)."""
    return int((saved_config.get("cluster") or {}).get("sequence_parallel", 1) or 1)


def resume_line(saved_config: dict, run: RunConfig) -> str | None:
    """One line when a resume changes the size: another data-parallel layout, so every rank starts from
    rank 0's trainer state and the data stream re-plans (data_pipeline/stream.py: every window not yet
    read is read once); ZeRO-3's shards are cut over the whole world either way, so at the same world
    size the engine loads them as they are, at another through the universal checkpoint."""
    old, new = saved_size(saved_config), run.cluster.sequence_parallel
    if old == new:
        return None
    return (f"resume: cluster.sequence_parallel {old} -> {new}: the data-parallel ranks change, the data stream "
            f"re-plans from rank 0's state")
