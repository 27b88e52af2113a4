"""Expert parallelism on 2 CPU ranks: `python bench/expert_parallel.py [--smoke] [--seq-len 256]`.

model=tiny_moe (8 experts, top 2, one shared, 3 MoE layers of 4), fp32, 1 thread a rank, gloo, ZeRO-3:
the real engine (pretrain/engine/build.py) built three ways in the same two processes: the pure-torch
experts (cluster.expert_parallel=null, the reference), AutoEP at EP 1 (every expert on every rank, AutoEP's
router and grouped experts) and at EP 2 (4 experts a rank, tokens exchanged by all-to-all). A step is the
loop's training pass (model_loss_and_stats), the engine's backward and its optimizer step, on the same
batch in every mode. The all-to-all is timed inside DeepSpeed (deepspeed.comm.all_to_all_single, which
AutoEP calls for its split plans and token exchanges); on gloo it blocks, so its time includes waiting
for the other rank. The modes alternate, round by round; medians. The last line is one JSON object.
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
MODES = {"pure torch": None, "AutoEP, EP 1": 1, "AutoEP, EP 2": 2}


def worker(seq_len: int, micro: int, steps: int, rounds: int) -> None:
    """Run by torchrun on 2 ranks; rank 0 prints one JSON line: {mode: {step_s, a2a_s, loss}}."""
    sys.path.insert(0, str(REPO))
    import deepspeed.comm as ds_comm
    import torch
    import torch.distributed as dist

    from pretrain.checks import compose_config
    from pretrain.engine.build import build_engine, init_distributed
    from pretrain.objective.diffusion import forward_process, make_schedule, model_loss_and_stats

    torch.set_num_threads(1)
    rank, world = init_distributed(600, shm_comm=False)
    assert world == 2, world
    clock = {"s": 0.0}
    inner = ds_comm.all_to_all_single

    def timed_all_to_all(*args, **kwargs):  # AutoEP's layer calls it through the module at each use
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        clock["s"] += time.perf_counter() - t0
        return out

    ds_comm.all_to_all_single = timed_all_to_all
    engines = {}
    for mode, ep in MODES.items():
        run = compose_config(["model=tiny_moe", "model.vocab_size=1024", f"trainer.seq_len={seq_len}",
                              f"model.max_sequence_length={max(seq_len, 1024)}", "trainer.precision=fp32",
                              f"trainer.micro_batch_size={micro}", f"trainer.global_batch_size={2 * micro}",
                              f"cluster.expert_parallel={'null' if ep is None else ep}"], world_size=2)
        engines[mode] = build_engine(run, world)
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own batch, the same in every mode
    x0 = torch.randint(0, 1023, (micro, seq_len), generator=g)
    noisy = forward_process(x0, 1023, torch.rand(micro, generator=g), make_schedule(run.mask), generator=g)
    times = {m: [] for m in MODES}
    a2a = {m: [] for m in MODES}
    losses = {m: [] for m in MODES}
    for _ in range(rounds):
        for mode, engine in engines.items():
            for step in range(steps + 1):  # the first of each round warms up
                dist.barrier()
                clock["s"] = 0.0
                t0 = time.perf_counter()
                loss, _ = model_loss_and_stats(engine, x0, noisy, "tokens")
                engine.backward(loss)
                engine.step()
                if step:
                    times[mode].append(time.perf_counter() - t0)
                    a2a[mode].append(clock["s"])
                losses[mode].append(loss.item())
    if rank == 0:
        print(json.dumps({m: {"step_s": statistics.median(times[m]), "a2a_s": statistics.median(a2a[m]),
                              "first_loss": losses[m][0]} for m in MODES}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="seconds: L = 64, 1 step, 1 round")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro", type=int, default=4, help="sequences a rank per step")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and mode")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    seq_len, steps, rounds = (64, 1, 1) if args.smoke else (args.seq_len, args.steps, args.rounds)
    if args.worker:
        return worker(seq_len, args.micro, steps, rounds)
    with socket.socket() as sock:  # a free loopback port for the two ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).resolve()), "--worker", "--steps", str(steps), "--rounds", str(rounds),
           "--seq-len", str(seq_len), "--micro", str(args.micro)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-5000:]}")
    raw = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    base = raw["pure torch"]["step_s"]
    print(f"model=tiny_moe fp32 ZeRO-3, {args.micro} x {seq_len} tokens a rank a step, 2 ranks (gloo, 1 thread "
          f"each): forward + backward + optimizer step, median of {steps} steps x {rounds} rounds")
    print("| mode | step s | / pure torch | all-to-all s | all-to-all share | first loss |\n"
          "|---|---:|---:|---:|---:|---:|")
    rows = {}
    for mode, r in raw.items():
        rows[mode] = {**r, "over_pure_torch": r["step_s"] / base, "all_to_all_share": r["a2a_s"] / r["step_s"]}
        print(f"| {mode} | {r['step_s']:.4f} | {r['step_s'] / base:.2f} | {r['a2a_s']:.4f} "
              f"| {100 * r['a2a_s'] / r['step_s']:.0f}% | {r['first_loss']:.6f} |")
    print(json.dumps({"rows": rows, "over_pure_torch": {m: r["over_pure_torch"] for m, r in rows.items()}}))


if __name__ == "__main__":
    main()
