"""Sequence parallelism on 2 CPU ranks: `python bench/sequence_parallel.py [--smoke] [--lengths 256 1024 2048]`.

SP 2 (one group: each rank holds half of every sequence, DeepSpeed's DistributedAttention swaps the
sequence slice for half of the heads by all-to-all around each attention) against SP 1 (2 data-parallel
ranks, each with half of the sequences, whole) at the same global shape: B sequences of L tokens a step,
so both hold B x L / 2 tokens a rank. model=tiny (4 blocks, 4 heads, 2 key/value heads), fp32, 1 thread a
rank, gloo. A step is the training pass as the loop runs it (pretrain.objective.diffusion.
model_loss_and_stats, with the rank's SequenceShard under SP 2), its backward, and one all-reduce of the
gradients (the data-parallel average under SP 1, the group's sum under SP 2: the same bytes either way).
ZeRO-3 and the optimizer are left out: they cost the same at both sizes (same parameters, same world).

The all-to-all is timed inside DeepSpeed: its `single_all_to_all` (the collective and its reshapes, 4 a
block forward and 4 backward) is wrapped with a clock. On gloo it blocks, so its time includes waiting
for the other rank. SP 1 and SP 2 alternate, round by round, in the same two processes; medians.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
B = 4  # sequences a step, over both ranks


def worker(lengths: list[int], steps: int, rounds: int) -> None:
    """Run by torchrun on 2 ranks; rank 0 prints one JSON line: {L: {sp: {step_s, a2a_s}}}."""
    sys.path.insert(0, str(REPO))
    import deepspeed.sequence.layer as ds_layer
    import torch
    import torch.distributed as dist

    from pretrain.checks import compose_config
    from pretrain.engine import sequence_parallel as sp
    from pretrain.engine.build import init_distributed
    from pretrain.model.transformer import LLaDAModel
    from pretrain.objective.diffusion import forward_process, make_schedule, model_loss_and_stats

    torch.set_num_threads(1)
    rank, world = init_distributed(600, shm_comm=False)
    assert world == 2, world
    clock = {"s": 0.0}
    inner = ds_layer.single_all_to_all

    def timed_all_to_all(*args, **kwargs):  # _SeqAllToAll looks it up in the module at each call
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        clock["s"] += time.perf_counter() - t0
        return out

    ds_layer.single_all_to_all = timed_all_to_all
    results: dict[int, dict[int, dict[str, float]]] = {}
    for L in lengths:
        run = compose_config(["model=tiny", "model.vocab_size=1024", f"trainer.seq_len={L}",
                              f"model.max_sequence_length={max(L, 1024)}", "cluster.sequence_parallel=2",
                              f"trainer.micro_batch_size={B}", f"trainer.global_batch_size={B}"], world_size=2)
        sp.init_groups(2)
        torch.manual_seed(0)
        model = LLaDAModel(run.model).float()
        shard = sp.make_shard(model, sp.Layout.of(run, rank, world))
        g = torch.Generator().manual_seed(1)  # the same batch on both ranks
        x0 = torch.randint(0, 1023, (B, L), generator=g)
        noisy = forward_process(x0, 1023, torch.rand(B, generator=g), make_schedule(run.mask), generator=g)
        mine = slice(rank * B // 2, (rank + 1) * B // 2)  # SP 1: this rank's half of the sequences
        part = type(noisy)(**{k: None if v is None else v[mine] for k, v in vars(noisy).items()})
        halves = {1: (x0[mine], part, None),
                  2: (x0, noisy, shard)}
        times = {1: [], 2: []}
        a2a = {1: [], 2: []}
        for _ in range(rounds):
            for size, (ids, nz, sh) in halves.items():
                for step in range(steps + 1):  # the first of each round warms up
                    model.zero_grad(set_to_none=True)
                    dist.barrier()
                    clock["s"] = 0.0
                    t0 = time.perf_counter()
                    loss, _ = model_loss_and_stats(model, ids, nz, "tokens", shard=sh)
                    loss.backward()
                    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                    dist.all_reduce(flat)
                    if step:
                        times[size].append(time.perf_counter() - t0)
                        a2a[size].append(clock["s"])
        results[L] = {size: {"step_s": statistics.median(times[size]), "a2a_s": statistics.median(a2a[size])}
                      for size in (1, 2)}
    if rank == 0:
        print(json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="seconds: L = 64, 2 steps, 1 round")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and size")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    lengths, steps, rounds = ([64], 2, 1) if args.smoke else (args.lengths, args.steps, args.rounds)
    if args.worker:
        return worker(lengths, steps, rounds)
    with socket.socket() as sock:  # a free loopback port for the two ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).resolve()), "--worker", "--steps", str(steps), "--rounds", str(rounds),
           "--lengths", *map(str, lengths)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-5000:]}")
    raw = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    print(f"model=tiny fp32, {B} sequences a step over 2 ranks (gloo, 1 thread each): forward + backward + gradient "
          f"all-reduce, median of {steps} steps x {rounds} rounds")
    print("| L | SP 1 step s | SP 2 step s | SP 2 / SP 1 | SP 2 all-to-all s | all-to-all share |\n"
          "|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for L in lengths:
        one, two = raw[str(L)]["1"], raw[str(L)]["2"]
        ratio, share = two["step_s"] / one["step_s"], two["a2a_s"] / two["step_s"]
        rows[L] = {"sp1_step_s": one["step_s"], "sp2_step_s": two["step_s"], "sp2_over_sp1": ratio,
                   "sp2_all_to_all_s": two["a2a_s"], "all_to_all_share": share}
        print(f"| {L} | {one['step_s']:.4f} | {two['step_s']:.4f} | {ratio:.2f} | {two['a2a_s']:.4f} "
              f"| {100 * share:.0f}% |")
    print(json.dumps({"rows": rows, "sp2_over_sp1": {L: r["sp2_over_sp1"] for L, r in rows.items()}}))


if __name__ == "__main__":
    main()
