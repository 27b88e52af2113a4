"""Fast sampling against today's sampler, side by side on one model: tokens per forward pass, wall time
per generated token, the speed-up, and token agreement with the scheduled sampler.

    .venv/bin/python bench/sampling.py [--source outputs/bench/sampling/demo] [--gen-length 64]
        [--block-length 16] [--rounds 2] [--threads 1]
    .venv/bin/python bench/sampling.py --smoke          # seconds: a random tiny model, 2 prompts, 16 tokens

--source is a run directory or an exported folder; without it the bench trains the demo
(`python -m pretrain.train experiment=demo`, about 4 minutes on 2 free cores) into
outputs/bench/sampling/demo, unless a finished run is there. Each prompt of PROMPTS (text of the demo
corpus's kind) is sampled alone (batch 1) at temperature 0, fp32, under each setting of SETTINGS; the
baseline is today's sampler (`steps` = gen_length: one token per pass). Agreement: the fraction of
generated positions whose token equals the baseline's, over all prompts. Each setting runs --rounds
times, interleaved, and its best round counts (the machine may be shared); wall time and the process's
CPU time (one thread: the compute, without the waits of a loaded machine) are both given. Prints a
table, then one JSON object.
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
from pretrain.model.kv_cache import KVCache  # noqa: E402
from pretrain.objective.sampler import generate  # noqa: E402

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


class Counted:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, ids, **kwargs):
        self.calls += 1
        return self.model(ids, **kwargs)


def demo_run(run_dir: Path) -> Path:
    if not (run_dir / "checkpoints" / "latest").is_file():
        cmd = [sys.executable, "-m", "pretrain.train", "experiment=demo", f"run_dir={run_dir}", "sample.at_end=false",
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


def run_setting(model, prompts, mask_id, gen_length, block_length, options):
    options = dict(options)
    steps = gen_length // options.pop("steps_div", 1)
    cache = options.pop("cache", None)
    counted = Counted(model)
    outs = []
    start, cpu = time.perf_counter(), time.process_time()
    for ids in prompts:
        prompt = torch.tensor([ids])
        out = generate(counted, prompt, gen_length, steps, mask_id, block_length,
                       cache=KVCache(cache) if cache else None, **options)
        outs.append(out[0, len(ids):].tolist())
    return outs, counted.calls, time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        model, prompts, mask_id = smoke_model()
        args.gen_length, args.block_length, args.rounds = 16, 8, 1
        where = "random tiny model (smoke)"
    else:
        source = open_source(str(args.source or demo_run(ROOT / "outputs" / "bench" / "sampling" / "demo")))
        model, mask_id = load_model(source), source.mask_id
        tok = source.tokenizer()
        prompts = [tok.encode(p).ids for p in PROMPTS]
        where = f"{source.checkpoint_dir or source.path} (step {source.step})"
    tokens = args.gen_length * len(prompts)
    run_setting(model, prompts[:1], mask_id, args.gen_length, args.block_length, {"cache": "dual"})  # warm-up
    results: dict[str, dict] = {}
    for _ in range(args.rounds):  # interleaved: a slow spell on a shared machine hits every setting alike
        for name, options in SETTINGS.items():
            outs, calls, seconds, cpu = run_setting(model, prompts, mask_id, args.gen_length, args.block_length,
                                                    options)
            best = results.setdefault(name, {"outs": outs, "calls": calls, "seconds": seconds, "cpu": cpu})
            best["seconds"], best["cpu"] = min(best["seconds"], seconds), min(best["cpu"], cpu)
    base = results["scheduled (today)"]
    rows = []
    for name, r in results.items():
        same = sum(a == b for o, p in zip(r["outs"], base["outs"], strict=False) for a, b in zip(o, p, strict=False))
        rows.append({"setting": name, "forwards": r["calls"], "tokens_per_forward": tokens / r["calls"],
                     "ms_per_token": 1000 * r["seconds"] / tokens, "speedup": base["seconds"] / r["seconds"],
                     "cpu_ms_per_token": 1000 * r["cpu"] / tokens, "cpu_speedup": base["cpu"] / r["cpu"],
                     "agreement": same / tokens})
    print(f"model: {where}; {len(prompts)} prompts alone, gen_length {args.gen_length}, block_length "
          f"{args.block_length}, temperature 0, fp32, {args.threads} thread(s), best of {args.rounds} rounds")
    print(f"{'setting':<26}{'forwards':>9}{'tok/fwd':>9}{'ms/tok':>9}{'speed-up':>10}{'cpu ms/tok':>11}"
          f"{'cpu speed-up':>13}{'agreement':>11}")
    for r in rows:
        print(f"{r['setting']:<26}{r['forwards']:>9}{r['tokens_per_forward']:>9.2f}{r['ms_per_token']:>9.2f}"
              f"{r['speedup']:>9.2f}x{r['cpu_ms_per_token']:>11.2f}{r['cpu_speedup']:>12.2f}x{r['agreement']:>11.3f}")
    summary = {"model": where, "gen_length": args.gen_length, "block_length": args.block_length, "rows": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
