"""Evaluate a trained model: the negative ELBO per token on shards, and multiple-choice accuracy.

    python -m pretrain.evaluate SOURCE [--data SHARD_DIR] [--split heldout] [--max-sequences 256]
        [--mc-num N] [--batch-size 16] [--seed 0] [--choices FILE.jsonl] [--step N] [--device auto]

SOURCE is a run directory (its newest checkpoint, or --step N) or an exported folder. Without
--choices it reads the windows of a built shard directory (default: the run's own, split `heldout`)
in manifest order and prints the NELBO per token (nats), an upper bound on -log p per token, with its
standard error, and the perplexity bound exp(NELBO) (--mc-num draws per window, default 8); the
estimator is pretrain/objective/likelihood.py's, the one the periodic eval during training uses. SFT
shards score the responses only (prompt never masked).

--choices FILE.jsonl: one {"prompt": str, "choices": [str, ...], "answer": index or the right choice}
per line; each choice is scored by the paper's conditional likelihood -log p(choice | prompt)
(Monte Carlo over masks of the choice, the prompt never masked, --mc-num draws (default 128), batched
by --batch-size), the lowest wins, and the accuracy is printed. A pair is tokenized as lm-eval does
(the prompt's trailing whitespace moves to the choice, whose tokens are those of prompt + choice after
the prompt's), so `python -m pretrain.lm_eval` gives the same numbers on the same pairs and seed.
`nll` holds each choice's estimate (nats), `nll_se` its Monte Carlo standard error (the draws' spread
/ sqrt(mc_num); null with --mc-num 1).

Output: one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from data_pipeline.merge import MIN_HELDOUT_WINDOWS
from data_pipeline.shards import DataError, Manifest, open_shard, read_blocks, token_dtype
from data_pipeline.tokenizer import fingerprint
from pretrain.checkpoint.zero_files import CheckpointError
from pretrain.engine.device import pick_device, pick_dtype
from pretrain.hf.format import FormatError
from pretrain.hf.pretrained import CHOICE_MC_NUM, Source, SourceError, encode_pair, load_model, open_source
from pretrain.objective.likelihood import NelboSums, answer_nll, draw_seed, nelbo_of_batch

NELBO_MC_NUM = 8  # mask draws per held-out window: windows are many, their mean averages the draws
MIN_SEQUENCES_FOR_SE = MIN_HELDOUT_WINDOWS  # below this the standard error over sequences is too uncertain to read


class EvalError(ValueError):
    """Evaluation inputs that do not fit the model."""


def check_shards(manifest: Manifest, directory: Path, split: str, source: Source) -> None:
    where = f"{directory}/manifest.json"
    if split not in manifest.splits or manifest.samples(split) == 0:
        raise EvalError(f"{where} has no windows in split {split!r} (splits: {', '.join(manifest.splits)})")
    if manifest.seq_len > source.model.max_sequence_length:
        raise EvalError(f"{where}: seq_len={manifest.seq_len} exceeds the model's max_sequence_length="
                        f"{source.model.max_sequence_length}")
    # the token ids must fit (a warm start's vocabulary need not hold the build's padding to a multiple of 128)
    if manifest.mask_id != source.mask_id or manifest.tokenizer_vocab_size > source.model.vocab_size:
        raise EvalError(f"{where}: mask id {manifest.mask_id} / vocabulary {manifest.tokenizer_vocab_size} do not fit "
                        f"the "
                        f"model's ({source.mask_id} / {source.model.vocab_size})")
    if fingerprint(source.tokenizer()) != manifest.tokenizer_fingerprint:
        raise EvalError(f"{where}: the shards were tokenized with another tokenizer than {source.tokenizer_path}")


def windows(directory: Path, manifest: Manifest, split: str) -> Iterator[tuple[np.ndarray, int | None, np.ndarray]]:
    """(tokens [L], prompt length or None, document starts [L] bool) of every window of a split, in
    manifest order."""
    dtype = token_dtype(manifest.vocab_size)
    for shard in manifest.splits[split]:
        for block in read_blocks(str(directory / shard.name), dtype, manifest.seq_len,
                                 fileobj=open_shard(directory, shard.name)):  # confined to the data directory
            for i, (row, starts) in enumerate(zip(block.tokens, block.start_rows(), strict=True)):
                yield row, None if block.prompt is None else int(block.prompt[i]), starts


def evaluate_nelbo(model, source: Source, directory: Path, split: str, max_sequences: int, mc_num: int,
                   batch_size: int, seed: int, device: str) -> dict:
    manifest = Manifest.load(directory)
    check_shards(manifest, directory, split, source)
    generator = torch.Generator().manual_seed(seed)
    sums = NelboSums()
    rows = itertools.islice(windows(directory, manifest, split), max_sequences)
    per_batch = max(1, batch_size // mc_num)  # sequences per pass, each with mc_num draws
    while chunk := list(itertools.islice(rows, per_batch)):
        x0 = torch.tensor(np.stack([r for r, _, _ in chunk]).astype(np.int64), device=device)
        prompt_len = None if chunk[0][1] is None else torch.tensor([p for _, p, _ in chunk])
        # A model trained with model.document_mask is scored the way it was trained: within documents.
        doc_start = torch.from_numpy(np.stack([s for _, _, s in chunk])) if source.model.document_mask else None
        sums.sums += nelbo_of_batch(model, x0, source.mask_id, mc_num, generator, prompt_len, batch_size,
                                    doc_start, source.model.block_size).sums  # a block model: the block NELBO
    est = sums.estimate()
    if est.sequences < MIN_SEQUENCES_FOR_SE:
        print(f"warning: {directory} split {split!r} gave {est.sequences} sequence(s) of {manifest.seq_len} tokens: "
              f"too few for a standard error ({'none' if est.sequences < 2 else 'a rough one'}); a larger split "
              f"(data.heldout_fraction when building) or --max-sequences gives one", file=sys.stderr, flush=True)
    return {"nelbo": est.nelbo, "se": est.se, "mc_se": est.mc_se, "perplexity_bound": est.perplexity_bound,
            "tokens": est.tokens, "sequences": est.sequences, "data": str(directory), "split": split,
            "mc_num": mc_num}


def read_choices(path: Path) -> list[dict]:
    if not path.is_file():
        raise EvalError(f"--choices {path}: no such file")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) \
                or not isinstance(item.get("choices"), list) or len(item["choices"]) < 2 \
                or not all(isinstance(c, str) for c in item["choices"]):
            raise EvalError(f"{path}:{n}: expected {{\"prompt\": str, \"choices\": [at least 2 str], \"answer\": ...}}")
        answer = item.get("answer")
        if isinstance(answer, str) and answer in item["choices"]:
            answer = item["choices"].index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(item["choices"]):
            raise EvalError(f"{path}:{n}: answer={item.get('answer')!r} is neither an index into choices nor one "
                            f"of them")
        items.append({"prompt": item["prompt"], "choices": item["choices"], "answer": answer})
    if not items:
        raise EvalError(f"--choices {path}: no items")
    return items


def evaluate_choices(model, source: Source, items: list[dict], mc_num: int, batch_size: int, seed: int,
                     device: str) -> dict:
    tok = source.tokenizer()
    limit = source.model.max_sequence_length
    encoded = []
    for n, item in enumerate(items, 1):
        pairs = [encode_pair(lambda text: tok.encode(text).ids, source.eos_id, item["prompt"], c)
                 for c in item["choices"]]  # as lm-eval pairs them: the prompt's trailing spaces go to each choice
        prompt, choices = pairs[0][0], [c for _, c in pairs]
        if any(len(prompt) + len(c) > limit for c in choices):
            raise EvalError(f"item {n}: prompt and a choice exceed the model's maximum of {limit} tokens")
        if any(not c for c in choices):
            raise EvalError(f"item {n}: a choice encodes to no tokens")
        encoded.append((prompt, choices))
    correct, scores, errors = 0, [], []
    for n, (prompt, choices) in enumerate(encoded):
        nll, se = [], []
        for j, choice in enumerate(choices):
            generator = torch.Generator().manual_seed(draw_seed(seed, n, j))  # order-independent draws
            mean, err = answer_nll(model, prompt, choice, source.mask_id, mc_num, generator, batch_size, device,
                                   source.model.block_size)
            nll.append(mean)
            se.append(err if math.isfinite(err) else None)  # one draw: no spread to measure
        pick = int(np.argmin(nll))
        correct += pick == items[n]["answer"]
        scores.append(nll)
        errors.append(se)
    return {"accuracy": correct / len(items), "correct": correct, "items": len(items), "mc_num": mc_num,
            "nll": scores, "nll_se": errors}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run directory or an exported Hugging Face folder")
    parser.add_argument("--data", help="a built shard directory (default: the run's data.dir)")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--max-sequences", type=int, default=256)
    parser.add_argument("--mc-num", type=int, default=None,
                        help=f"mask draws per sequence (default 8) or per choice (default {CHOICE_MC_NUM}, as lm-eval)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--choices", help="multiple-choice jsonl: {prompt, choices, answer} per line")
    parser.add_argument("--step", type=int, default=None, help="a run's checkpoint at this step (default: newest)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    args = parser.parse_args(argv)
    if args.mc_num is None:
        args.mc_num = CHOICE_MC_NUM if args.choices else NELBO_MC_NUM
    try:
        for name in ("max_sequences", "mc_num", "batch_size"):
            if getattr(args, name) <= 0:
                raise EvalError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
        items = read_choices(Path(args.choices)) if args.choices else None
        source = open_source(args.source, args.step)
        directory = None
        if items is None:
            directory = Path(args.data) if args.data else source.data_dir
            if directory is None:
                raise EvalError(f"{args.source} is an exported folder: give --data SHARD_DIR")
            check_shards(Manifest.load(directory), directory, args.split, source)
        device = pick_device(args.device)
        model = load_model(source, device, pick_dtype(args.dtype, device))
        if items is not None:
            result = evaluate_choices(model, source, items, args.mc_num, args.batch_size, args.seed, device)
        else:
            result = evaluate_nelbo(model, source, directory, args.split, args.max_sequences, args.mc_num,
                                    args.batch_size, args.seed, device)
    except (EvalError, DataError, FormatError, SourceError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(finite_or_null({"source": str(source.checkpoint_dir or source.path), **result}), allow_nan=False),
          flush=True)


def finite_or_null(value):
    """NaN and infinities are not JSON: an undefined number (the se of one sequence) is printed as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return value


if __name__ == "__main__":
    main(sys.argv[1:])
