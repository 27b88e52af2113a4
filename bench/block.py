"""Block diffusion on the demo corpus: held-out NELBO at equal steps, and the cost of the 2L pass.

    .venv/bin/python bench/block.py [--steps 400] [--smoke]

1. Quality: the demo's model and data (experiment=demo, bidirectional from step 0: block diffusion
   refuses the demo's attention annealing and shift) trained `--steps` steps for each block size B in
   {4, 16, L=64} (B = L is LLaDA), one more at B = 4 with block.embedding_noise (LLaDA 2.0's noise on
   masked embeddings; here from scratch, not a conversion), and the autoregressive baseline of
   bench/demo_quality.py (same network, causal, next-token loss) for the same number of steps. Each
   diffusion model is scored on the held-out split by `evaluate`'s NELBO at its own block size (the
   block NELBO for B < L: block j given the clean blocks before it; B = L: LLaDA's), the AR model by its
   next-token CE. All nats per token, upper bounds or estimates of -log p: lower is better.
2. Cost: one training micro-step (forward, loss on the masked rows, backward) of model=tiny at seq
   `--cost-seq` (micro batch 8, fp32, one thread: on a loaded machine more threads only wait for
   each other), B < L against B = L, each in a fresh process: the median step time over 10 steps
   after 3 warm-up steps, and the activation memory: the bytes autograd saves for the backward
   (saved-tensor hooks, each storage once), what grows with the tokens in the pass.
Prints two tables, then one JSON object. --smoke: a few steps and windows, seconds to minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pretrain.evaluate import evaluate_nelbo  # noqa: E402
from pretrain.hf.pretrained import load_model, open_source  # noqa: E402

DEMO = ["experiment=demo", "model.attention_anneal_steps=0", "model.shift_prediction=false", "sample.at_end=false",
        "trainer.eval_every=0", "trainer.log_every=50", "trainer.ckpt_every_minutes=0"]


def train(run_dir: Path, steps: int, extra: list[str]) -> None:
    if (run_dir / "checkpoints" / "latest").is_file():
        print(f"using the finished run in {run_dir}", flush=True)
        return
    cmd = [sys.executable, "-m", "pretrain.train", *DEMO, f"trainer.max_steps={steps}", f"run_dir={run_dir}",
           "resume=never", *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def heldout_nelbo(run_dir: Path, windows: int, mc_num: int) -> dict:
    source = open_source(run_dir)
    data_dir = source.data_dir if source.data_dir.is_absolute() else ROOT / source.data_dir
    return evaluate_nelbo(load_model(source), source, data_dir, "heldout", windows, mc_num, 64, 0, "cpu")


def one_cost(block: int, seq: int) -> dict:
    """In a fresh process: the median micro-step time and saved activations at block size `block`."""
    from pretrain.checks import compose_config
    from pretrain.model.transformer import LLaDAModel
    from pretrain.objective.block import pass_block_size
    from pretrain.objective.diffusion import forward_process, make_schedule, model_loss_and_stats

    torch.set_num_threads(1)
    run = compose_config(["model=tiny", "model.vocab_size=1024", f"trainer.seq_len={seq}"])
    torch.manual_seed(0)
    model = LLaDAModel(run.model).float()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 1000, (8, seq), generator=g)
    nb = seq // block
    times, saved = [], {}

    def pack(t):
        if t.device.type == "cpu" and t.untyped_storage().data_ptr():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for i in range(13):
        t = torch.rand(8, nb, generator=g) * 0.999 + 0.001
        noisy = forward_process(x0, 1023, t, make_schedule(run.mask), g)
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = model_loss_and_stats(model, x0, noisy, block_size=pass_block_size(block, seq))
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - start)
        if i == 0:
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            activations = sum(n for ptr, n in saved.items() if ptr not in params)
    return {"block": block, "step_s": statistics.median(times), "peak_mb": activations / 2**20}


def cost(block: int, seq: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_cost", str(block), "--cost-seq", str(seq)], cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "block")
    p.add_argument("--windows", type=int, default=469, help="held-out windows scored (the demo has 469)")
    p.add_argument("--mc-num", type=int, default=8)
    p.add_argument("--embedding-noise", type=float, default=0.02)
    p.add_argument("--cost-seq", type=int, default=512)
    p.add_argument("--smoke", action="store_true", help="4 steps, 16 windows, 2 draws, seq 64: seconds per run")
    p.add_argument("--_cost", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._cost is not None:
        print(json.dumps(one_cost(args._cost, args.cost_seq)))
        return
    if args.smoke:
        args.steps, args.windows, args.mc_num, args.cost_seq = 4, 16, 2, 64
        args.out = args.out.with_name(args.out.name + "-smoke")
    runs = {"B=4": ["block.size=4"], "B=16": ["block.size=16"], "B=L=64 (LLaDA)": [],
            f"B=4, embedding noise {args.embedding_noise:g}": ["block.size=4",
                                                               f"block.embedding_noise={args.embedding_noise}"]}
    rows = {}
    for i, (name, extra) in enumerate(runs.items()):
        run_dir = args.out / f"run{i}-s{args.steps}"
        train(run_dir, args.steps, extra)
        rows[name] = heldout_nelbo(run_dir, args.windows, args.mc_num)
    from demo_quality import train_autoregressive, windows  # noqa: E402  (bench/demo_quality.py)

    first = args.out / f"run0-s{args.steps}"
    source = open_source(first)
    data_dir = source.data_dir if source.data_dir.is_absolute() else ROOT / source.data_dir
    run_cfg = OmegaConf.to_container(OmegaConf.load(first / "config.yaml"), resolve=True)
    held, train_windows = windows(data_dir, "heldout")[: args.windows], windows(data_dir, "train")
    *_, ar_ce, _ = train_autoregressive(source, run_cfg, train_windows, held, 0.0, run_cfg["seed"], args.steps)

    print(f"\nheld-out NELBO after {args.steps} steps ({args.windows} windows of 64 tokens, {args.mc_num} draws)")
    print(f"{'model':<34} {'nats/token':>11} {'+-':>7}")
    for name, r in rows.items():
        print(f"{name:<34} {r['nelbo']:>11.3f} {r['se']:>7.3f}")
    print(f"{'autoregressive (next-token CE)':<34} {ar_ce:>11.3f}")
    costs = [cost(b, args.cost_seq) for b in (4, 16, args.cost_seq)]
    base = costs[-1]
    print(f"\none micro-step, model=tiny, seq {args.cost_seq}, micro batch 8, fp32, CPU")
    print(f"{'block':>6} {'step s':>8} {'x B=L':>6} {'act. MB':>8} {'x B=L':>6}")
    for c in costs:
        print(f"{c['block']:>6} {c['step_s']:>8.3f} {c['step_s'] / base['step_s']:>6.2f} {c['peak_mb']:>8.0f} "
              f"{c['peak_mb'] / max(base['peak_mb'], 1e-9):>6.2f}")
    print(json.dumps({"steps": args.steps, "nelbo": {k: round(v["nelbo"], 4) for k, v in rows.items()},
                      "ar_ce": round(ar_ce, 4), "cost": costs}))


if __name__ == "__main__":
    main()
