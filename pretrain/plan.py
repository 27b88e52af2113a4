"""Plan a run before any GPU hour is spent: `python -m pretrain.plan model=... cluster=... [overrides] [--mfu 0.4]`.

Prints parameters, FLOPs per token, memory per GPU (ZeRO-3 model states, activations with and
without checkpointing, the loss, gathered weights), communication per step, step time and tokens
per day at the given MFU, and GPU-hours for the token budget (trainer.max_tokens, else max_steps);
warns when a GPU's memory (cluster.gpu_memory_gb) would be exceeded. Last line: one JSON object.

Memory model (bytes; bf16 training; flash-style attention, so no L x L scores are kept):
  model states   16 x params / GPUs: bf16 weights 2 + bf16 grads 2 + fp32 master, m, v 12 (ZeRO-3)
  gathered       2 blocks' bf16 weights (the current and the prefetched one) and the embedding and head
                 with their bf16 gradients, whole while in use
  activations    per token per block 2 x (6 d + 2 kv_heads x head_dim + 3 ffn): the block's input,
                 the norm outputs, q/k/v, the attention output, the residual, the SwiGLU gate, up
                 and product; a checkpointed block keeps only its input (2 d) and one block's worth is
                 alive during its recompute
  loss           one chunk of fp32 logits and its softmax gradient (pretrain/model/output_head.py), the
                 fp32 head-gradient accumulator, and the masked rows' hidden states
Sequence parallelism (cluster.sequence_parallel = N, pretrain/engine/sequence_parallel.py): each GPU
holds 1/N of every sequence, so activations and the loss's rows are per L / N tokens; the batch math
counts GPUs / N data-parallel ranks (N times the accumulation steps); each block's attention moves
q, k, v and its output through an all-to-all in the forward and again in the backward.
Expert parallelism (cluster.expert_parallel = N, pretrain/engine/expert_parallel.py): a GPU holds the
experts of its EP rank, num_experts / N of each MoE layer, sharded over the GPUs / N ranks that hold the
same ones, so the model states per GPU are those of ZeRO-3 without EP (16 x params / GPUs either way);
what changes is the gather: a block's forward gathers num_experts / N experts, not all of them (less
gathered memory, less all-gather traffic), and each MoE layer sends its tokens' top_k copies to their
experts and back (an all-to-all of d_model per copy, forward and backward).
Checked against bench/gpu.py on one H200 (BENCHMARKS.md): llada_8b with 8 layers at micro batch 4,
64.5 GB measured without checkpointing and 48.5 GB with it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass

from data_pipeline.shards import DataError
from pretrain.checks import compose_config, resolve_vocab
from pretrain.config import ConfigError, RunConfig
from pretrain.engine.zero_sizes import block_params
from pretrain.model.flops import flops_per_token, peak_tflops
from pretrain.model.output_head import CHUNK_ELEMENTS
from pretrain.model.transformer import checkpoint_stride, padded_width
from pretrain.objective.block import all_sizes

GB = 1e9
MASKED_SHARE = 0.5  # E[t] under the paper's t ~ U(0, 1): half the positions are masked on average


def total_params(m) -> int:
    matrices = 1 if m.tie_embeddings else 2  # embedding and head, one matrix when tied
    return sum(block_params(m, i) for i in range(m.n_layers)) + matrices * m.vocab_size * m.d_model + m.d_model


def active_params(m) -> int:
    """The parameters one token uses: all but the routed experts it is not sent to (model.moe)."""
    e = m.moe
    idle = 0 if e is None else m.layer_expert_params * m.moe_layers * (e.num_experts - e.top_k) // e.num_experts
    return total_params(m) - idle


@dataclass
class Plan:
    model: str
    gpus: int
    sequence_parallel: int  # GPUs that share each sequence (1: none)
    params: int
    active_params: int  # per token (a mixture of experts: the top_k routed experts, not all)
    flops_per_token: int
    tokens_per_step: int
    accumulation: int
    model_states_gb: float
    gathered_gb: float
    activations_gb: float  # with trainer.activation_checkpointing as configured
    activations_none_gb: float
    activations_full_gb: float
    loss_gb: float
    total_gb: float
    gpu_memory_gb: float | None
    comm_gb_per_step: float  # sent+received per GPU (ring all-gather / reduce-scatter)
    all_to_all_gb_per_step: float  # sent per GPU by sequence parallelism's all-to-alls (0 without it)
    expert_parallel: int  # GPUs that share a layer's experts (1: every GPU gathers every expert)
    expert_all_to_all_gb_per_step: float  # sent per GPU by expert parallelism's token all-to-alls (0 without)
    peak_tflops: float | None
    mfu: float
    step_s: float | None
    tokens_per_day: float | None
    token_budget: float | None
    gpu_hours: float | None


def activation_bytes(run: RunConfig, stride: int) -> float:
    m = run.model
    tokens = local_tokens(run)
    per_block = 2 * (6 * m.d_model + 2 * m.n_kv_heads * m.head_size + 3 * padded_width(m.mlp_hidden_size)) * tokens
    if stride == 0:
        return m.n_layers * per_block
    checkpointed = math.ceil(m.n_layers / stride)
    return checkpointed * 2 * m.d_model * tokens + (m.n_layers - checkpointed) * per_block + per_block


def local_tokens(run: RunConfig) -> int:
    """Tokens one GPU runs per micro-step: the micro-batch's (2L each for block diffusion), 1/N of each
    under sequence parallelism."""
    t = run.trainer
    return t.micro_batch_size * t.seq_len * block_factor(run) // run.cluster.sequence_parallel


def all_to_all_bytes(run: RunConfig) -> float:
    """Sent per GPU per micro-step by the Ulysses all-to-alls: q and the output (n_heads x head_dim per
    token), k and v (n_kv_heads x head_dim), bf16, (N-1)/N of each leaving the GPU, forward and backward."""
    m, n = run.model, run.cluster.sequence_parallel
    width = 2 * (m.n_heads + m.n_kv_heads) * m.head_size
    return 2 * m.n_layers * 2 * width * local_tokens(run) * (n - 1) / n


def expert_all_to_all_bytes(run: RunConfig) -> float:
    """Sent per GPU per micro-step by expert parallelism: each token's top_k copies (d_model, bf16) to their
    experts and back, forward and backward, (N-1)/N of them to another GPU."""
    m, n = run.model, run.cluster.expert_parallel or 1
    if m.moe is None or n == 1:
        return 0.0
    return m.moe_layers * 2 * 2 * local_tokens(run) * m.moe.top_k * m.d_model * 2 * (n - 1) / n


def block_factor(run: RunConfig) -> int:
    """2 when any step of the run trains blocks (x_t with x_0, 2L tokens): memory is the schedule's peak."""
    return 2 if min(all_sizes(run.block, run.trainer.seq_len)) < run.trainer.seq_len else 1


def plan_flops_per_token(run: RunConfig) -> int:
    """The most expensive step of the block schedule (the smallest block < L), as FlexAttention
    executes it on a GPU; plain LLaDA otherwise."""
    size = min(all_sizes(run.block, run.trainer.seq_len))
    return flops_per_token(run.model, run.trainer.seq_len, size, sparse=True)


def loss_bytes(run: RunConfig) -> float:
    m, t = run.model, run.trainer
    rows = MASKED_SHARE * t.micro_batch_size * t.seq_len / run.cluster.sequence_parallel
    chunk_rows = max(1, CHUNK_ELEMENTS // m.vocab_size)
    chunk = min(rows, chunk_rows) * m.vocab_size * 4 * 2
    accumulator = m.vocab_size * m.d_model * 4 if rows > chunk_rows else 0
    return chunk + accumulator + rows * m.d_model * 2 * 2


def make_plan(run: RunConfig, mfu: float, device_name: str | None = None) -> Plan:
    m, t, c = run.model, run.trainer, run.cluster
    gpus = c.nodes * c.gpus_per_node
    params = total_params(m)
    fpt = plan_flops_per_token(run)
    sp = c.sequence_parallel
    accumulation = t.global_batch_size // (t.micro_batch_size * (gpus // sp))
    tokens_per_step = t.global_batch_size * t.seq_len
    states = 16 * params / gpus
    ep = c.expert_parallel or 1
    away = m.layer_expert_params * (ep - 1) // ep  # a MoE block's experts held by other EP ranks: never gathered here
    gathered = 2 * 2 * (block_params(m) - away) + (1 if m.tie_embeddings else 2) * 2 * 2 * m.vocab_size * m.d_model
    acts = {k: activation_bytes(run, k) for k in (0, 1, checkpoint_stride(t.activation_checkpointing))}
    configured = acts[checkpoint_stride(t.activation_checkpointing)]
    loss = loss_bytes(run)
    total = states + gathered + configured + loss
    # ZeRO-3 per micro-step: all-gather weights for the forward and again for the backward, and
    # reduce-scatter gradients; each moves (N-1)/N of 2 bytes x params through every GPU.
    experts = m.layer_expert_params * m.moe_layers  # under EP gathered over the gpus / ep ranks holding the same
    comm = accumulation * 3 * 2 * ((params - experts) * (gpus - 1) / gpus
                                   + experts / ep * (gpus // ep - 1) / (gpus // ep))
    peak = peak_tflops(device_name or "", c.peak_tflops) if (device_name or c.peak_tflops) else None
    budget = t.max_tokens if t.max_tokens is not None else (t.max_steps * tokens_per_step if t.max_steps else None)
    step_s = tokens_per_step * fpt / (gpus * peak * 1e12 * mfu) if peak else None
    return Plan(model=m.name, gpus=gpus, sequence_parallel=sp, params=params, active_params=active_params(m),
                flops_per_token=fpt,
                tokens_per_step=tokens_per_step,
                accumulation=accumulation, model_states_gb=states / GB, gathered_gb=gathered / GB,
                activations_gb=configured / GB, activations_none_gb=acts[0] / GB, activations_full_gb=acts[1] / GB,
                loss_gb=loss / GB, total_gb=total / GB, gpu_memory_gb=c.gpu_memory_gb, comm_gb_per_step=comm / GB,
                all_to_all_gb_per_step=accumulation * all_to_all_bytes(run) / GB, expert_parallel=ep,
                expert_all_to_all_gb_per_step=accumulation * expert_all_to_all_bytes(run) / GB,
                peak_tflops=peak, mfu=mfu, step_s=step_s,
                tokens_per_day=tokens_per_step / step_s * 86400 if step_s else None, token_budget=budget,
                gpu_hours=budget * fpt / (peak * 1e12 * mfu) / 3600 if peak and budget else None)


def warnings_for(p: Plan, run: RunConfig) -> list[str]:
    out = []
    if p.gpu_memory_gb and p.total_gb > p.gpu_memory_gb:
        hint = ("; trainer.activation_checkpointing=full needs "
                f"{p.total_gb - p.activations_gb + p.activations_full_gb:.1f} GB"
                if p.activations_full_gb < p.activations_gb else "")
        out.append(f"WARNING: {p.total_gb:.1f} GB per GPU exceeds cluster.gpu_memory_gb={p.gpu_memory_gb:g} "
                   f"(cluster={run.cluster.name}){hint}")
    return out


def row(label: str, gb: float) -> str:
    return f"  {label:<46}{gb:8.1f}"


def report(p: Plan, run: RunConfig) -> str:
    t = run.trainer
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [
        f"model {p.model}: {p.params / 1e9:.2f}B parameters ({p.active_params / 1e9:.2f}B active), "
        f"{p.flops_per_token / 1e9:.1f} GFLOPs per token "
        f"(seq {t.seq_len})",
        f"layout: {p.gpus} GPUs ({run.cluster.name}), micro batch {t.micro_batch_size}, global {t.global_batch_size}"
        f" -> {p.accumulation} accumulation steps, {p.tokens_per_step:,} tokens per step"
        + (f"; sequence parallel {p.sequence_parallel}: {t.seq_len // p.sequence_parallel:,} tokens of each sequence "
           f"per GPU" if p.sequence_parallel > 1 else ""),
        "memory per GPU (GB):",
        row(f"model states (ZeRO-3, 16 B/param / {p.gpus})", p.model_states_gb),
        row("gathered weights (2 blocks, embedding, head)", p.gathered_gb),
        row(f"activations, checkpointing={t.activation_checkpointing}", p.activations_gb)
        + f"   (none {p.activations_none_gb:.1f}, full {p.activations_full_gb:.1f})",
        row("loss (masked rows, one logits chunk)", p.loss_gb),
        row("total", p.total_gb) + f"   of {fmt(p.gpu_memory_gb, 'g')}",
        f"communication per step per GPU: {p.comm_gb_per_step:,.1f} GB"
        + (" (ZeRO-3)" if p.sequence_parallel > 1 or p.expert_parallel > 1 else "")
        + (f", {p.all_to_all_gb_per_step:,.1f} GB (sequence-parallel all-to-all)" if p.sequence_parallel > 1 else "")
        + (f"; expert parallel {p.expert_parallel}: {p.expert_all_to_all_gb_per_step:,.1f} GB (token all-to-all), "
           f"{run.model.moe.num_experts // p.expert_parallel} experts of each MoE layer per GPU"
           if p.expert_parallel > 1 else ""),
        f"at {100 * p.mfu:.0f}% MFU of {fmt(p.peak_tflops, 'g')} TFLOP/s: step {fmt(p.step_s, '.2f')} s, "
        f"{fmt(p.tokens_per_day and p.tokens_per_day / 1e9, ',.1f')}B tokens/day",
        f"token budget {fmt(p.token_budget and p.token_budget / 1e9, ',.1f')}B: "
        f"{fmt(p.gpu_hours, ',.0f')} GPU-hours",
    ]
    return "\n".join(lines + warnings_for(p, run))


def main(argv: list[str]) -> Plan:
    """Hydra overrides, plus --mfu X (default 0.4) and --gpu NAME (the card whose peak to use when
    cluster.peak_tflops is null, e.g. H800; default H100). Every error is one line and exit 2."""
    from data_pipeline.cli import add_overrides, parser

    p = parser("pretrain.plan", __doc__)
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization, in (0, 1], for the time estimates")
    p.add_argument("--gpu", default="H100", help="the card whose dense bf16 peak to use when cluster.peak_tflops "
                                                 "is null (H100, H800, A100, ...)")
    add_overrides(p)
    args = p.parse_args(argv)
    try:
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu {args.mfu:g} must be in (0, 1]: the share of the peak the run reaches, e.g. 0.4")
        # the cluster's size (any sequence-parallel size divides nothing yet), then validate for it
        probe = compose_config([*args.overrides, "cluster.sequence_parallel=1", "cluster.expert_parallel=null"],
                               world_size=1)
        run = compose_config(args.overrides, world_size=probe.cluster.nodes * probe.cluster.gpus_per_node)
        resolve_vocab(run)  # model.vocab_size=null (model=tiny, small): the shards' vocabulary
        plan = make_plan(run, args.mfu, args.gpu)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report(plan, run))
    print(json.dumps(asdict(plan)))
    return plan


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
