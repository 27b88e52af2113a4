"""Mixture of experts on the CPU: `python bench/moe.py [--smoke] [--steps N] [--threads T]`.

1. Step time: model=tiny_moe (8 experts of width 64, top 2 + 1 shared, here in all 4 layers) against the same model
   dense with the FFN width that gives the same active parameters per token (192), forward + backward +
   AdamW in fp32, one process, side by side in one run; and, inside one MoE layer's forward, the share
   of the router (fp32 scores, group-limited top-k) and of the dispatch (sort, per-expert matmuls,
   weighted scatter-add). No all-to-all: expert parallelism is not wired (pretrain/engine/expert_parallel.py).
2. Load balance over a short run: tokens per expert, max / mean per MoE layer, at the start and the end
   of a training run with the expert-bias update on (model.moe.bias_update_rate) and off, on a skewed
   (Zipf) token stream so that the router has something to be unbalanced about.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from pretrain.checks import compose_config
from pretrain.model.moe import routers, take_load, update_expert_bias
from pretrain.model.transformer import LLaDAModel, count_params


def configs(vocab: int):
    moe = compose_config(["model=tiny_moe", f"model.vocab_size={vocab}", "model.moe.first_dense_layers=0"]).model
    # 3 x 128 x 192: the weights of 3 experts of width 64 (top 2 + the shared one)
    dense = replace(moe, name="tiny_dense_equal_active", moe=None, mlp_hidden_size=192)
    return moe, dense


def zipf_batch(gen, batch: int, seq: int, vocab: int) -> torch.Tensor:
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), batch * seq, replacement=True, generator=gen).view(batch, seq)


def step_time(cfg, batch, steps: int) -> float:
    torch.manual_seed(0)
    model = LLaDAModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        loss = model(batch).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[len(times[2:]) // 2]  # the median after two warm-up steps


def routing_share(cfg, tokens: int, reps: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    moe = LLaDAModel(cfg).transformer.blocks[1].moe
    x = torch.randn(tokens, cfg.d_model)
    parts = {"router": 0.0, "experts": 0.0, "shared": 0.0}
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            idx, w = moe.router(x)
            t1 = time.perf_counter()
            moe.experts(x, idx, w)
            t2 = time.perf_counter()
            moe.shared(x)
            t3 = time.perf_counter()
            parts["router"] += t1 - t0
            parts["experts"] += t2 - t1
            parts["shared"] += t3 - t2
    total = sum(parts.values())
    return parts["router"] / total, parts["experts"] / total, parts["shared"] / total


def balance(cfg, steps: int, batch: int, seq: int, vocab: int, rate: float) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    cfg = replace(cfg, moe=replace(cfg.moe, bias_update_rate=rate, expert_bias=True))
    model = LLaDAModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    rs = routers(model)
    first = last = None
    for step in range(steps):
        x0 = zipf_batch(gen, batch, seq, vocab)
        noisy = torch.where(torch.rand(x0.shape, generator=gen) < 0.5, vocab - 1, x0)
        masked = noisy == vocab - 1
        ce, _ = model(noisy, targets=x0, masked=masked)
        ce.sum().div(x0.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        load = take_load(rs, "cpu")
        update_expert_bias(rs, load)
        ratio = (load.max(1).values / load.mean(1)).tolist()
        first = ratio if step == 0 else first
        last = ratio
    return first, last


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="seconds: tiny batches, few steps")
    p.add_argument("--steps", type=int, default=200, help="training steps of the load-balance run")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    vocab = 1024
    batch, seq, timed, steps = (2, 64, 3, 5) if args.smoke else (8, 256, 10, args.steps)
    moe, dense = configs(vocab)
    cm, cd = count_params(LLaDAModel(moe)), count_params(LLaDAModel(dense))
    x = zipf_batch(torch.Generator().manual_seed(0), batch, seq, vocab)
    t_moe, t_dense = step_time(moe, x, timed), step_time(dense, x, timed)
    print(f"step time, fp32, batch {batch} x seq {seq}, {args.threads} thread(s), median of {timed} steps")
    print("| model | params | active | non-emb. active | step s | ratio |\n|---|---:|---:|---:|---:|---:|")
    print(f"| {dense.name} | {cd['params']:,} | {cd['active_params']:,} | {cd['active_non_embedding_params']:,} "
          f"| {t_dense:.4f} | 1.00 |")
    print(f"| {moe.name} | {cm['params']:,} | {cm['active_params']:,} | {cm['active_non_embedding_params']:,} "
          f"| {t_moe:.4f} | {t_moe / t_dense:.2f} |")
    r, e, s = routing_share(moe, batch * seq, timed)
    print(f"\none MoE layer's forward ({batch * seq} tokens): router {100 * r:.0f}%, dispatch + routed experts "
          f"{100 * e:.0f}%, shared expert {100 * s:.0f}% (no all-to-all: no expert parallelism)")
    print(f"\nload balance, tokens per expert max / mean per MoE layer (8 experts, top 2), {steps} steps of "
          f"{batch} x {seq} Zipf tokens, lr 3e-3\n| bias update rate | step 1 | step {steps} |\n|---:|---|---|")
    balance_rows = {}
    for rate in (0.0, 0.001, 0.01):
        first, last = balance(moe, steps, batch, seq, vocab, rate)
        balance_rows[rate] = {"first": first, "last": last}
        print(f"| {rate:g} | {' '.join(f'{v:.2f}' for v in first)} | {' '.join(f'{v:.2f}' for v in last)} |")
    print(json.dumps({"step_s_moe": t_moe, "step_s_dense": t_dense, "ratio_moe_over_dense": t_moe / t_dense,
                      "routing_share": {"router": r, "experts": e, "shared": s},
                      "balance": {f"{k:g}": {n: [float(x) for x in v] for n, v in row.items()}
                                  for k, row in balance_rows.items()}}))


if __name__ == "__main__":
    main()
