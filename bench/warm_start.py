"""What a warm start from an autoregressive model buys: held-out NELBO at equal steps, from scratch vs
from a Llama trained autoregressively on the same corpus.

    .venv/bin/python bench/warm_start.py [--ar-steps 400] [--steps 200] [--eval-every 50] [--out outputs/bench/warm]
        [--smoke]

1. A byte-level BPE (vocabulary 1024) with Llama 3's special tokens (<|end_of_text|>, reserved tokens: the
   mask token is a reserved one) is trained on the demo corpus, and the corpus is built into 64-token shards.
2. A LlamaForCausalLM of the `tiny` shapes is trained with transformers' own causal LM loss on the train
   split for --ar-steps steps and saved (safetensors) with the tokenizer: the autoregressive source.
3. Two diffusion runs of python -m pretrain.train, same shapes, data, seed and steps: one from scratch,
   one with model.init_from=the source (bidirectional from step 0). Both evaluate the held-out NELBO
   (the same estimator and draws) every --eval-every steps.
Prints both curves side by side with their ratio; the last line is one JSON object. Everything runs on
one thread (OMP_NUM_THREADS=1): on a shared 2-core machine two threads per process spin against each
other (a tiny Llama step took 5-14 s with 2 threads, 0.4 s with 1); the figures do not depend on it.
Needs transformers (pip install '.[hf]').
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.build import build  # noqa: E402
from data_pipeline.config import BuildConfig, DataConfig  # noqa: E402
from data_pipeline.shards import Manifest  # noqa: E402
from data_pipeline.sources import demo_documents  # noqa: E402
from pretrain.evaluate import windows  # noqa: E402
from pretrain.hf.causal_import import source_fields  # noqa: E402
from pretrain.hf.format import read_config  # noqa: E402

SEQ = 64
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4))]
TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)


def make_data(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok_path, shards = out / "tokenizer.json", out / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(demo_documents(), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_path))
    data = DataConfig(inputs=["demo"], dir=str(shards), format="text", text_field="text", prompt_field="prompt",
                      response_field="response", tokenizer=str(tok_path), vocab_size=1024, seq_len=SEQ,
                      shard_bytes=1 << 20, member_bytes=1 << 16, heldout_fraction=0.05, on_decode_error="replace",
                      shuffle_buffer=64, num_workers=0, url=None, on_corrupt="error", batches_per_item=1)
    build(data, BuildConfig(workers=1, task=0, tasks=1, merge=True, progress=False, progress_every_s=0))
    return shards


def train_autoregressive(out: Path, shards: Path, steps: int, seed: int) -> tuple[Path, float, float]:
    """A tiny Llama trained on the train split with next-token cross-entropy; (folder, final loss, seconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = out / "llama-ar"
    if (folder / "ar.json").is_file():  # trained by an earlier call
        done = json.loads((folder / "ar.json").read_text())
        return folder, done["final_loss"], done["seconds"]
    manifest = Manifest.load(shards)
    data = torch.from_numpy(np.stack([w.astype(np.int64) for w, _, _ in windows(shards, manifest, "train")]))
    torch.manual_seed(seed)
    vocab = manifest.tokenizer_vocab_size  # Llama 3 style: the embedding has exactly the tokenizer's rows
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TINY))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    for step in range(steps):
        for group in opt.param_groups:  # 5% warmup, then linear decay to 10%
            group["lr"] = 3e-3 * min((step + 1) / (0.05 * steps), 1 - 0.9 * step / steps)
        batch = data[torch.randint(0, len(data), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            print(f"autoregressive step {step:>5} | loss {loss.item():.4f}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text((out / "tokenizer.json").read_text())
    (folder / "ar.json").write_text(json.dumps({"final_loss": loss.item(), "seconds": seconds}))
    return folder, loss.item(), seconds


def model_overrides(folder: Path) -> list[str]:
    fields = source_fields(read_config(folder), str(folder))
    fields["vocab_size"] = None
    return [f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in fields.items()]


def diffusion_run(run_dir: Path, shards: Path, tokenizer: Path, model: list[str], args) -> dict[int, float]:
    if not (run_dir / "metrics.jsonl").is_file():
        cmd = [sys.executable, "-m", "pretrain.train", "model=tiny", *model, f"data.dir={shards}",
               f"data.tokenizer={tokenizer}", "data.vocab_size=1024", f"trainer.seq_len={SEQ}",
               "trainer.micro_batch_size=16", "trainer.global_batch_size=16", f"trainer.max_steps={args.steps}",
               f"trainer.eval_every={args.eval_every}",
               "trainer.eval_batches=8", "trainer.log_every=50", "trainer.ckpt_every=0", "trainer.precision=fp32",
               "optim.lr=3e-3", "optim.schedule.unit=steps", "optim.schedule.points=[[0,0.1],[20,1.0]]",
               "logging.mode=disabled", "sample.at_end=false", f"seed={args.seed}", f"run_dir={run_dir}"]
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r}


def main() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # the training subprocesses
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ar-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench/warm")
    p.add_argument("--smoke", action="store_true", help="seconds: 2 autoregressive and 2 diffusion steps")
    args = p.parse_args()
    if args.smoke:  # the code paths, not the figures (tests/bench/test_smoke.py)
        args.ar_steps, args.steps, args.eval_every = 2, 2, 2
        args.out = args.out if args.out != p.get_default("out") else "outputs/bench/warm-smoke"
    out = Path(args.out).resolve()
    shards = make_data(out)
    source, ar_loss, ar_s = train_autoregressive(out, shards, args.ar_steps, args.seed)
    model = model_overrides(source)
    scratch = diffusion_run(out / "scratch", shards, out / "tokenizer.json", model, args)
    warm = diffusion_run(out / "warm", shards, out / "tokenizer.json", [*model, f"model.init_from={source}"], args)
    print(f"autoregressive source: {args.ar_steps} steps, final train loss {ar_loss:.3f}, {ar_s:.0f} s")
    print(f"{'step':>6} | {'scratch NELBO':>13} | {'warm NELBO':>10} | {'warm / scratch':>14}")
    rows = []
    for step in sorted(set(scratch) & set(warm)):
        rows.append({"step": step, "scratch": round(scratch[step], 4), "warm": round(warm[step], 4),
                     "ratio": round(warm[step] / scratch[step], 4)})
        print(f"{step:>6} | {scratch[step]:>13.4f} | {warm[step]:>10.4f} | {warm[step] / scratch[step]:>14.3f}")
    print(json.dumps({"ar_steps": args.ar_steps, "ar_final_loss": round(ar_loss, 4), "steps": args.steps,
                      "curves": rows}))


if __name__ == "__main__":
    main()
