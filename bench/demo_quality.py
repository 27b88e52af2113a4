"""The demo's held-out loss beside what a user would train instead: an autoregressive model.

    .venv/bin/python bench/demo_quality.py [--run-dir outputs/bench/demo] [--demo-args ...] [--smoke]

1. LLaDA: `python -m pretrain.train experiment=demo` (what `make demo` runs) into --run-dir, unless a
   finished run is already there; its training time is the sum of its optimizer steps' times
   (metrics.jsonl step_time_s: eval, checkpoints and start-up left out).
2. Autoregressive: the same network (same config, weights initialised alike) with causal attention and
   the next-token loss, trained in a plain torch loop on the same train windows (random batches of the
   same shape), with the same AdamW settings and the same warmup-stable-decay schedule in fractions of
   its run, for the same training time (its step count is set from its first 20 steps' speed), or with
   --match steps for the same number of steps (the same compute: a step of either costs about the
   same), fp32, in this process.
3. Both on every window of the held-out split: LLaDA's NELBO (pretrain/objective/likelihood.py, 16 mask
   draws per window) and the autoregressive model's next-token cross-entropy (tokens 2..L of each window:
   the first has no context). Both are nats per token and bound -log p from above (the NELBO) or
   estimate it (the AR loss); lower is better. The AR model is also scored every 100 steps, and its
   best point is listed too: on so small a corpus it memorises the train split within the budget.

Prints a table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.shards import Manifest, read_blocks, token_dtype  # noqa: E402
from pretrain.engine.lr_schedule import lr_fraction  # noqa: E402
from pretrain.evaluate import evaluate_nelbo  # noqa: E402
from pretrain.hf.pretrained import load_model, open_source  # noqa: E402
from pretrain.model.transformer import LLaDAModel  # noqa: E402


class CausalSDPA:
    """The attention backend interface (pretrain/model/attention.py) with a causal mask: this bench's
    autoregressive baseline only; LLaDA never uses it."""

    def documents(self, doc_start):
        return None

    def __call__(self, q, k, v, docs=None):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2)


def windows(directory: Path, split: str) -> torch.Tensor:
    m = Manifest.load(directory)
    rows = [b.tokens for s in m.splits[split]
            for b in read_blocks(str(directory / s.name), np.dtype(token_dtype(m.vocab_size)), m.seq_len)]
    return torch.from_numpy(np.concatenate(rows).astype(np.int64))


def training_seconds(run_dir: Path) -> tuple[float, int]:
    """The sum of the optimizer steps' times and the last step, from metrics.jsonl."""
    total, last = 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "step_time_s" in r:
            total += r["step_time_s"] * (r["step"] - last)
            last = r["step"]
    return total, last


def train_demo(run_dir: Path, extra: list[str]) -> None:
    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "checkpoints" / "latest").is_file():
        print(f"using the finished run in {run_dir}", flush=True)
        return
    cmd = [sys.executable, "-m", "pretrain.train", "experiment=demo", f"run_dir={run_dir}", "resume=never", *extra]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def train_autoregressive(source, run_cfg: dict, train: torch.Tensor, held: torch.Tensor, budget_s: float,
                         seed: int, fixed_steps: int | None = None):
    """-> (final model, steps, training seconds, held-out CE at the end, best held-out CE and its step).
    The held-out CE every 100 steps (outside the timed part): on 87.5k train tokens a run of a few
    thousand steps memorises them, and a user would keep the best point (early stopping)."""
    torch.manual_seed(seed)  # the demo's seed: the same initial weights as LLaDA's
    # Plain next-token prediction: without the demo's shift (which would make the output at i predict
    # i + 2 here) and without its annealed mask (this model is causal throughout).
    model = LLaDAModel(dataclasses.replace(source.model, shift_prediction=False, attention_anneal_steps=0)).float()
    for block in model.transformer.blocks:
        block.attention = CausalSDPA()
    o, t = run_cfg["optim"], run_cfg["trainer"]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]}, {"params": rest, "weight_decay": 0}],
                            lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])
    points, unit = o["schedule"]["points"], o["schedule"]["unit"]
    assert unit == "fraction", f"the demo's schedule is in fractions of the run, not {unit}"
    g = torch.Generator().manual_seed(seed)
    batch = t["global_batch_size"]
    steps, step, elapsed, best = fixed_steps, 0, 0.0, (float("inf"), 0)
    while steps is None or step < steps:
        step += 1
        for group in opt.param_groups:
            group["lr"] = o["lr"] * lr_fraction(points, step / (steps or 10**9))
        x0 = train[torch.randint(len(train), (batch,), generator=g)]
        start = time.perf_counter()
        loss = F.cross_entropy(model(x0)[:, :-1].flatten(0, 1), x0[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
        opt.step()
        elapsed += time.perf_counter() - start
        if step == 20 and fixed_steps is None:  # fits the run to the budget (its warmup so far: against a far end)
            steps = max(20, int(budget_s / (elapsed / 20)))
        if step % 100 == 0 or step == steps:
            ce = next_token_ce(model.eval(), held)
            model.train()
            best = min(best, (ce, step))
            print(f"autoregressive step {step}/{steps} loss {loss.item():.4f} held-out {ce:.4f} {elapsed:.0f}s",
                  flush=True)
    return model.eval(), step, elapsed, ce, best


@torch.no_grad()
def next_token_ce(model, held: torch.Tensor) -> float:
    total, count = 0.0, 0
    for chunk in held.split(64):
        logits = model(chunk)[:, :-1]
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=ROOT / "outputs" / "bench" / "demo")
    p.add_argument("--demo-args", nargs="*", default=[], help="more overrides for the demo run")
    p.add_argument("--mc-num", type=int, default=16)
    p.add_argument("--match", choices=("time", "steps"), default="time",
                   help="give the autoregressive model the demo's training time, or its number of steps (the "
                        "same compute: a step of either costs about the same; for a machine shared with other jobs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads here (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="seconds: a 3-step demo in its own run dir, equal steps")
    args = p.parse_args()
    if args.smoke:  # the code paths, not the figures (tests/bench/test_smoke.py)
        if args.run_dir == p.get_default("run_dir"):
            args.run_dir = ROOT / "outputs" / "bench" / "demo-smoke"
        args.demo_args = [*args.demo_args, "trainer.max_steps=3", "trainer.eval_every=0", "sample.at_end=false",
                          "logging.mode=disabled"]
        args.mc_num, args.match = 1, "steps"
    if args.threads:
        torch.set_num_threads(args.threads)
    train_demo(args.run_dir, args.demo_args)
    run_cfg = OmegaConf.to_container(OmegaConf.load(args.run_dir / "config.yaml"), resolve=True)
    source = open_source(args.run_dir)
    data_dir = source.data_dir if source.data_dir.is_absolute() else ROOT / source.data_dir
    budget, demo_steps = training_seconds(args.run_dir)
    held, train = windows(data_dir, "heldout"), windows(data_dir, "train")

    llada = load_model(source)
    nelbo = evaluate_nelbo(llada, source, data_dir, "heldout", len(held), args.mc_num, 64, 0, "cpu")
    _, ar_steps, ar_s, ar_ce, (best_ce, best_step) = train_autoregressive(
        source, run_cfg, train, held, budget, run_cfg["seed"], demo_steps if args.match == "steps" else None)

    rows = [("LLaDA (experiment=demo)", demo_steps, budget, nelbo["nelbo"], nelbo["se"]),
            ("autoregressive, same shape", ar_steps, ar_s, ar_ce, None),
            ("  its best held-out point", best_step, ar_s * best_step / ar_steps, best_ce, None)]
    print(f"\nheld-out split: {len(held)} windows of {held.shape[1]} tokens; train: {len(train)} windows")
    print(f"{'model':<28} {'steps':>6} {'train s':>8} {'nats/token':>11} {'ppl':>8}")
    for name, steps, secs, nats, se in rows:
        err = f" +- {se:.3f}" if se else ""
        print(f"{name:<28} {steps:>6} {secs:>8.0f} {nats:>11.3f} {np.exp(nats):>8.1f}{err}")
    print(f"gap: {nelbo['nelbo'] - best_ce:.3f} nats/token (LLaDA's NELBO - AR's best); "
          f"{nelbo['nelbo'] - ar_ce:.3f} against AR's end")
    print(json.dumps({"llada_nelbo": nelbo["nelbo"], "llada_se": nelbo["se"], "llada_steps": demo_steps,
                      "llada_train_s": budget, "ar_ce": ar_ce, "ar_steps": ar_steps, "ar_train_s": ar_s,
                      "ar_best_ce": best_ce, "ar_best_step": best_step, "gap_to_best": nelbo["nelbo"] - best_ce,
                      "gap": nelbo["nelbo"] - ar_ce, "heldout_windows": len(held)}))


if __name__ == "__main__":
    main()
