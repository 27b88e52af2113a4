"""Fast sampling against today's sampler, side by side on one model: tokens per forward pass, wall time
per generated token, the speed-up, and token agreement with the scheduled sampler.

    .venv/bin/python bench/sampling.py [--source outputs/bench/sampling/demo] [--gen-length 64]
        [--block-length 16] [--rounds 2] [--threads 1]
    .venv/bin/python bench/sampling.py --smoke          # seconds: a random tiny model, 2 prompts, 16 tokens
    .venv/bin/python bench/sampling.py --block-source outputs/bench/sampling/block16   # a block model

--source is a run directory or an exported folder; without it the bench trains the demo
(`python -m pretrain.train experiment=demo`, about 4 minutes on 2 free cores) into
outputs/bench/sampling/demo, unless a finished run is there. Each prompt of PROMPTS (text of the demo
corpus's kind) is sampled alone (batch 1) at temperature 0, fp32, under each setting of SETTINGS; the
baseline is today's sampler (`steps` = gen_length: one token per pass). Agreement: the fraction of
generated positions whose token equals the baseline's, over all prompts. Each setting runs --rounds
times, interleaved, and its best round counts (the machine may be shared); wall time and the process's
CPU time (one thread: the compute, without the waits of a loaded machine) are both given.

A second table does the same for a block diffusion model (BLOCK_SETTINGS; --block-source, or the bench
trains BLOCK_DEMO into outputs/bench/sampling/block16): its baseline is the block sampler without a
cache, and the exact block cache must agree with it on every token. Prints both tables, then one JSON
object ("rows", "block_rows").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pretrain.hf.pretrained import load_model, open_source  # noqa: E402
from pretrain.model.kv_cache import make_cache  # noqa: E402
from pretrain.objective.sampler import generate, generate_blocks  # noqa: E402

PROMPTS = ["The module", "Return a new list containing all", "If the", "This function", "Raise an exception if",
           "The default value is", "Return the absolute value of", "Create a new", "When the", "A string",
           "The following", "Return True if", "Print the", "This is", "Convert the", "The number of"]

# name -> the sampler's options; steps None = gen_length (one token per pass at most: today's default)
SETTINGS = {
    "scheduled (today)": {},
    "scheduled, steps/4": {"steps_div": 4},
    "threshold 0.9": {"threshold": 0.9},
    "threshold 0.5": {"threshold": 0.5},
    "threshold 0.3": {"threshold": 0.3},
    "factor 1.0": {"factor": 1.0},
    "prefix cache": {"cache": "prefix"},
    "dual cache": {"cache": "dual"},
    "threshold 0.5 + prefix": {"threshold": 0.5, "cache": "prefix"},
    "threshold 0.5 + dual": {"threshold": 0.5, "cache": "dual"},
}
# A block diffusion model, decoded block by block: the first is the baseline.
BLOCK_SETTINGS = {
    "block, no cache (today)": {},
    "block cache (exact)": {"cache": "block"},
    "threshold 0.5": {"threshold": 0.5},
    "threshold 0.5 + block cache": {"threshold": 0.5, "cache": "block"},
}
# The demo as a block model of 16 tokens (BD3LM's size), without the demo's annealing and shift (a block
# model attends block-causally from the first step), trained long enough to be confident in places.
BLOCK_DEMO = ["experiment=demo", "block=bd3lm", "model.attention_anneal_steps=0", "model.shift_prediction=false",
              "trainer.max_steps=400"]


class Counted:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, ids, **kwargs):
        self.calls += 1
        return self.model(ids, **kwargs)


def demo_run(run_dir: Path, overrides=("experiment=demo",)) -> Path:
    if not (run_dir / "checkpoints" / "latest").is_file():
        cmd = [sys.executable, "-m", "pretrain.train", *overrides, f"run_dir={run_dir}", "sample.at_end=false",
               "logging.mode=disabled"]
        print("training:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return run_dir


def smoke_model():
    """A random tiny model and a made-up prompt set: the code path in seconds, no figures."""
    from pretrain.checks import compose_config
    from pretrain.model.transformer import LLaDAModel

    cfg = compose_config(["model=tiny", "model.vocab_size=256", "model.attention=sdpa"]).model
    torch.manual_seed(0)
    return LLaDAModel(cfg).eval(), [[5, 6, 7], [9, 10]], 255


def run_setting(model, prompts, mask_id, gen_length, block_length, options, block_size=None):
    """block_size None: LLaDA's sampler in blocks of block_length; else a block model's, block by block."""
    options = dict(options)
    steps = gen_length // options.pop("steps_div", 1)
    cache = options.pop("cache", None)
    counted = Counted(model)
    outs = []
    start, cpu = time.perf_counter(), time.process_time()
    for ids in prompts:
        prompt = torch.tensor([ids])
        if block_size:
            out = generate_blocks(counted, prompt, gen_length, steps, mask_id, block_size,
                                  cache=make_cache(cache, block_size), **options)
        else:
            out = generate(counted, prompt, gen_length, steps, mask_id, block_length, cache=make_cache(cache, None),
                           **options)
        outs.append(out[0, len(ids):].tolist())
    return outs, counted.calls, time.perf_counter() - start, time.process_time() - cpu


def compare(settings, model, prompts, mask_id, args, block_size=None) -> list[dict]:
    """Each setting --rounds times, interleaved (a slow spell on a shared machine hits every setting alike),
    its best round; the first setting is the baseline."""
    tokens = args.gen_length * len(prompts)
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, options in settings.items():
            outs, calls, seconds, cpu = run_setting(model, prompts, mask_id, args.gen_length, args.block_length,
                                                    options, block_size)
            best = results.setdefault(name, {"outs": outs, "calls": calls, "seconds": seconds, "cpu": cpu})
            best["seconds"], best["cpu"] = min(best["seconds"], seconds), min(best["cpu"], cpu)
    base = next(iter(results.values()))
    rows = []
    for name, r in results.items():
        same = sum(a == b for o, p in zip(r["outs"], base["outs"], strict=False) for a, b in zip(o, p, strict=False))
        rows.append({"setting": name, "forwards": r["calls"], "tokens_per_forward": tokens / r["calls"],
                     "ms_per_token": 1000 * r["seconds"] / tokens, "speedup": base["seconds"] / r["seconds"],
                     "cpu_ms_per_token": 1000 * r["cpu"] / tokens, "cpu_speedup": base["cpu"] / r["cpu"],
                     "agreement": same / tokens})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'setting':<30}{'forwards':>9}{'tok/fwd':>9}{'ms/tok':>9}{'speed-up':>10}{'cpu ms/tok':>11}"
          f"{'cpu speed-up':>13}{'agreement':>11}")
    for r in rows:
        print(f"{r['setting']:<30}{r['forwards']:>9}{r['tokens_per_forward']:>9.2f}{r['ms_per_token']:>9.2f}"
              f"{r['speedup']:>9.2f}x{r['cpu_ms_per_token']:>11.2f}{r['cpu_speedup']:>12.2f}x{r['agreement']:>11.3f}")


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None)
    parser.add_argument("--block-source", default=None, help="a block diffusion run or folder (default: BLOCK_DEMO)")
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tables", default="llada,block", help="which comparisons: llada, block or both")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    tables = set(args.tables.split(","))
    if not tables or tables - {"llada", "block"}:
        parser.error(f"--tables {args.tables}: give llada, block or llada,block")
    torch.set_num_threads(args.threads)
    if args.smoke:
        model, prompts, mask_id = smoke_model()
        block_model, block_prompts, block_size, block_mask_id = model, prompts, 8, mask_id  # served block-causally
        args.gen_length, args.block_length, args.rounds = 16, 8, 1
        where = block_where = "random tiny model (smoke)"
    else:
        bench = ROOT / "outputs" / "bench" / "sampling"
        model = prompts = where = block_model = block_prompts = block_size = block_where = None
        if "llada" in tables:
            source = open_source(str(args.source or demo_run(bench / "demo")))
            model, mask_id = load_model(source), source.mask_id
            prompts = [source.tokenizer().encode(p).ids for p in PROMPTS]
            where = f"{source.checkpoint_dir or source.path} (step {source.step})"
    if "block" in tables and not args.smoke:
        block_source = open_source(str(args.block_source or demo_run(bench / "block16", BLOCK_DEMO)))
        if not block_source.model.block_size:
            parser.error(f"--block-source {args.block_source}: not a block diffusion model (no block_size)")
        block_model, block_size = load_model(block_source), block_source.model.block_size
        block_mask_id = block_source.mask_id
        block_prompts = [block_source.tokenizer().encode(p).ids for p in PROMPTS]
        block_where = f"{block_source.checkpoint_dir or block_source.path} (step {block_source.step})"
    rows = block_rows = None
    if "llada" in tables:
        run_setting(model, prompts[:1], mask_id, args.gen_length, args.block_length, {"cache": "dual"})  # warm-up
        rows = compare(SETTINGS, model, prompts, mask_id, args)
        print(f"model: {where}; {len(prompts)} prompts alone, gen_length {args.gen_length}, block_length "
              f"{args.block_length}, temperature 0, fp32, {args.threads} thread(s), best of {args.rounds} rounds")
        print_table(rows)
    if "block" in tables:
        run_setting(block_model, block_prompts[:1], block_mask_id, args.gen_length, None, {"cache": "block"},
                    block_size)  # warm-up
        block_rows = compare(BLOCK_SETTINGS, block_model, block_prompts, block_mask_id, args, block_size)
        print(f"\nblock diffusion model: {block_where}; block size {block_size}, {len(block_prompts)} prompts alone, "
              f"gen_length {args.gen_length}, steps = gen_length, temperature 0, fp32, {args.threads} thread(s), "
              f"best of {args.rounds} rounds")
        print_table(block_rows)
    summary = {"model": where, "gen_length": args.gen_length, "block_length": args.block_length, "rows": rows,
               "block_model": block_where, "block_size": block_size, "block_rows": block_rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
