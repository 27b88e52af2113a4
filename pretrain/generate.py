"""Sampling from a trained model: `python -m pretrain.generate`.

    python -m pretrain.generate SOURCE --prompt "The" [--prompt ...] [--prompts-file FILE]
        [--gen-length 128] [--steps 128] [--block-length 128] [--temperature 0] [--cfg-scale 0]
        [--remasking low_confidence|random] [--threshold P | --factor F] [--cache none|prefix|dual|block]
        [--batch-size 8] [--seed 0] [--device auto] [--dtype auto] [--stop STRING ...] [--output jsonl|text]

SOURCE is a run directory (its newest checkpoint, or --step N) or an exported folder. The reverse
process and the meaning of each setting: pretrain/objective/sampler.py.

Fast sampling (docs/fast_sampling.md): --threshold P commits, at each step, every masked token of the
block predicted with probability >= P (at least the schedule's share), --factor F Fast-dLLM's factor
rule; with either, --steps is a cap and a block ends as soon as it is decoded. --cache prefix|dual
reuses keys and values within a block (an approximation for this bidirectional model); --cache block
is a block diffusion model's exact cache (each committed block computed once, the same tokens).

Prompts of a batch are left-padded, the padding kept out of attention by a mask: a batch gives each
prompt what it gets alone. The completion is cut at the first EOS and
before the first `--stop` string (repeatable; e.g. --stop $'\\n\\n').

--output jsonl (default): one JSON line per prompt: "prompt", "completion" (text), "prompt_ids",
"completion_ids" (the tokens kept, up to the one that completes a stop string), "finish" ("eos",
"stop" or "length"), and "settings" (the sampler's settings, the batch's seed, the source and step),
so a line says how it was made. --output text: each prompt followed by its completion, then an
empty line.
"""


from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from data_pipeline.shards import DataError
from pretrain.checkpoint.zero_files import CheckpointError
from pretrain.engine.device import pick_device, pick_dtype
from pretrain.hf.format import FormatError
from pretrain.hf.pretrained import SourceError, load_model, open_source
from pretrain.model.kv_cache import CACHES, make_cache
from pretrain.objective.sampler import (
    REMASKING,
    GenerateError,
    check_settings,
    cut_completion,
    generate,
    generate_block_rows,
    left_pad,
)


# -- command line -----------------------------------------------------------------------------------
def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    out = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise GenerateError(f"--prompts-file {path}: no such file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise GenerateError(f"--prompts-file {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                                f"{e.start})") from None
        except OSError as e:
            raise GenerateError(f"--prompts-file {path}: cannot be read ({e.strerror or e})") from None
        out += [line for line in text.splitlines() if line.strip()]
    if not out:
        raise GenerateError("no prompt: give --prompt TEXT or --prompts-file FILE")
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run directory or an exported Hugging Face folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts-file", help="one prompt per line")
    parser.add_argument("--step", type=int, default=None, help="a run's checkpoint at this step (default: newest)")
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128, help="passes of the model; with --threshold or --factor "
                        "a cap (each block at most steps/blocks passes, ending when decoded)")
    parser.add_argument("--block-length", type=int, default=None, help="default: gen-length (one block)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--cfg-scale", type=float, default=0.0)
    parser.add_argument("--remasking", default="low_confidence", choices=REMASKING)
    fast = parser.add_mutually_exclusive_group()
    fast.add_argument("--threshold", type=float, default=None, help="parallel decoding: commit every masked token "
                      "of the block with probability >= this (and at least the surest one)")
    fast.add_argument("--factor", type=float, default=None, help="parallel decoding by Fast-dLLM's factor rule: "
                      "the n most confident while the n-th has probability >= 1 - factor/(n+1)")
    parser.add_argument("--cache", default="none", choices=("none", *CACHES),
                        help="KV cache: prefix or dual, refreshed per block (Fast-dLLM; approximate for a "
                        "full-attention model); block: the exact cache of a block diffusion model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--stop", action="append", default=[], help="cut the completion before this string (repeat)")
    parser.add_argument("--output", default="jsonl", choices=("jsonl", "text"))
    args = parser.parse_args(argv)
    try:
        check_settings(args.gen_length, args.steps, args.block_length, args.remasking, args.cfg_scale,
                       args.temperature, args.threshold, args.factor)
        if args.batch_size <= 0:
            raise GenerateError(f"--batch-size={args.batch_size} must be positive")
        prompts = read_prompts(args.prompt, args.prompts_file)
        source = open_source(args.source, args.step)
        tok = source.tokenizer()
        encoded = [tok.encode(p).ids for p in prompts]
        limit = source.model.max_sequence_length
        for i, ids in enumerate(encoded):
            if len(ids) + args.gen_length > limit:
                raise GenerateError(f"prompt {i + 1} ({prompts[i][:40]!r}...) has {len(ids)} tokens; with "
                                    f"--gen-length {args.gen_length} that exceeds the model's maximum {limit}")
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        try:
            make_cache(args.cache, source.model.block_size)
        except ValueError as e:
            raise GenerateError(f"--{e} ({args.source})") from None
        model = load_model(source, device, dtype)
    except (GenerateError, DataError, FormatError, SourceError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    settings = {"gen_length": args.gen_length, "steps": args.steps,
                "block_length": args.block_length or args.gen_length, "temperature": args.temperature,
                "cfg_scale": args.cfg_scale, "remasking": args.remasking, "threshold": args.threshold,
                "factor": args.factor, "cache": args.cache, "stop": args.stop,
                "batch_size": args.batch_size, "dtype": str(dtype).removeprefix("torch."),
                "source": str(source.checkpoint_dir or source.path), "step": source.step}
    for lo in range(0, len(prompts), args.batch_size):
        batch = encoded[lo: lo + args.batch_size]
        padded, prompt_mask = left_pad(batch, source.eos_id, device)
        width = padded.shape[1]
        if source.model.block_size:  # a block diffusion model: block by block, each row alone (objective/sampler.py)
            out = generate_block_rows(model, padded, prompt_mask, args.gen_length, args.steps, source.mask_id,
                                      source.model.block_size, args.temperature, args.cfg_scale, args.remasking,
                                      args.seed + lo, args.threshold, args.factor,
                                      partial(make_cache, args.cache, source.model.block_size))
        else:
            out = generate(model, padded, args.gen_length, args.steps, source.mask_id, args.block_length,
                           args.temperature, args.cfg_scale, args.remasking, args.seed + lo, args.threshold,
                           args.factor, prompt_mask, make_cache(args.cache, None))
        for i, row in enumerate(out[:, width:].tolist()):
            ids, text, finish = cut_completion(row, tok.decode, source.eos_id, args.stop)
            if args.output == "text":
                print(f"{prompts[lo + i]}{text}\n", flush=True)
                continue
            print(json.dumps({"prompt": prompts[lo + i], "completion": text, "prompt_ids": batch[i],
                              "completion_ids": ids, "finish": finish,
                              "settings": {**settings, "seed": args.seed + lo}}), flush=True)

if __name__ == "__main__":
    main(sys.argv[1:])
