"""Host time per optimizer step of the DeepSpeed ZeRO-3 engine against plain torch, on the CPU.

    python bench/engine.py                 # --rounds 3 --steps 12; --smoke: 1 round of 2 steps

The model has llada_1b's structure (22 blocks, 32 query / 4 key-value heads) at a width so small
(d_model 64, seq 32) that compute is negligible: what a step costs here is mostly Python and
bookkeeping, the part of a GPU step that only hides behind the kernels while the host keeps ahead.
Variants, each in its own process (DeepSpeed's linear, once installed, stays for the process), in
alternating rounds, fp32, one rank, 2 micro-batches per step:
  plain       LLaDAModel + torch AdamW + grad clipping, no DeepSpeed (the floor)
  ours        pretrain.engine.build_engine with conf/deepspeed/zero3.yaml
  ds_linear   the same with memory_efficient_linear=true (DeepSpeed's default: its own F.linear)
  ds_default  that, and `numactl --hardware` run for every gradient bucket as DeepSpeed's CPU
              accelerator does (pretrain.engine counts the NUMA nodes once)
  persist     ours with every parameter persistent (never released and re-gathered; one rank only)
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPE = ["model=llada_1b", "model.d_model=64", "model.n_heads=32", "model.n_kv_heads=4", "model.mlp_hidden_size=160",
         "model.vocab_size=512", "trainer.seq_len=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
         "cluster=local_cpu", "trainer.precision=fp32", "trainer.compile=false"]
DS_LINEAR = ["deepspeed.zero_optimization.memory_efficient_linear=true"]
VARIANTS = {"plain": [], "ours": [], "ds_linear": DS_LINEAR, "ds_default": DS_LINEAR,
            "persist": ["deepspeed.zero_optimization.stage3_param_persistence_threshold=10000000000"]}
ACCUM, WARMUP = 2, 3


def time_steps(variant: str, steps: int) -> list[float]:
    """Seconds per optimizer step of one variant, in this process."""
    sys.path.insert(0, str(REPO))
    import torch

    from pretrain.checks import compose_config
    from pretrain.engine import build as E
    from pretrain.model.transformer import LLaDAModel
    from pretrain.objective.diffusion import forward_process, make_schedule, model_loss_and_stats

    run = compose_config(SHAPE + VARIANTS[variant])
    torch.set_num_threads(1)
    schedule, gen = make_schedule(run.mask), torch.Generator().manual_seed(0)
    B, L, V = run.trainer.micro_batch_size, run.trainer.seq_len, run.model.vocab_size

    def micro_batches():
        for _ in range(ACCUM):
            x0 = torch.randint(0, V - 1, (B, L), generator=gen)
            yield x0, forward_process(x0, V - 1, torch.rand(B, generator=gen), schedule, gen)

    if variant == "plain":
        torch.manual_seed(run.seed)
        model = LLaDAModel(run.model)
        opt = torch.optim.AdamW(model.parameters(), lr=run.optim.lr)

        def step():
            for x0, noisy in micro_batches():
                (model_loss_and_stats(model, x0, noisy)[0] / ACCUM).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), run.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        if variant == "ds_default":
            E._count_cpu_devices_once = lambda: None
        E.init_distributed(60, shm_comm=False)
        engine = E.build_engine(run, 1)

        def step():
            for x0, noisy in micro_batches():
                engine.backward(model_loss_and_stats(engine, x0, noisy)[0])
                engine.step()

    times = []
    for i in range(WARMUP + steps):
        start = time.perf_counter()
        step()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant per round")
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="seconds: 1 round of 2 steps (the paths, not the speed)")
    a = p.parse_args(argv)
    if a.smoke:
        a.rounds, a.steps = 1, 2
    if a.variant:
        print(json.dumps(time_steps(a.variant, a.steps)))
        return
    times = {v: [] for v in VARIANTS}
    for r in range(a.rounds):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", v, "--steps", str(a.steps)], cwd=REPO,
                                 capture_output=True, text=True, check=True).stdout
            times[v] += json.loads(out.strip().splitlines()[-1])
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{v} {1e3 * statistics.median(t):.1f} ms"
                                                        for v, t in times.items()), flush=True)
    ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
    print(f"\n{'variant':<10} {'ms/step':>8} {'x plain':>8} {'overhead ms/micro-batch':>24}")
    for v in VARIANTS:
        print(f"{v:<10} {ms[v]:>8.1f} {ms[v] / ms['plain']:>8.2f} {(ms[v] - ms['plain']) / ACCUM:>24.1f}")
    print(json.dumps({"bench": "engine", "ms_per_step": {v: round(x, 2) for v, x in ms.items()},
                      "step_time_over_ours": {v: round(x / ms["ours"], 3) for v, x in ms.items() if v != "ours"},
                      "rounds": a.rounds, "steps": a.steps}))

if __name__ == "__main__":
    main(sys.argv[1:])
