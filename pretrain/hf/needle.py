"""A needle-in-a-haystack task for lm-eval, written for one model: `python -m pretrain.hf.needle`.

    python -m pretrain.hf.needle SOURCE OUT_DIR --lengths 4096 32768 [--depths 0 0.25 0.5 0.75 1] [--per-cell 4]
    python -m pretrain.lm_eval SOURCE --tasks needle --include_path OUT_DIR --log_samples --output_path results/

A "secret number" sentence is hidden at a relative depth of filler text (the demo corpus's prose: it
reads like the haystack and holds no number of the kind asked for), and the document ends with the question.
The model scores the needle's number against three other numbers of as many digits (multiple choice,
the conditional likelihood of each), so a model that did not find it is right one time in four. The
prompt is sized with SOURCE's tokenizer: prompt and answer take at most LENGTH tokens (lm-eval's context
is cut from the left beyond the model's max_sequence_length, which would cut the needle), and each
line of OUT_DIR/needle.jsonl records its length in tokens and the depth, for a breakdown from
`--log_samples`. A draw is seeded (--seed): the same SOURCE and arguments write the same task.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

NEEDLE = " The secret number is {}."
QUESTION = " Question: what is the secret number? Answer: the secret number is"
YAML = """task: needle
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list: [{{metric: acc}}]
"""


def filler_words() -> list[str]:
    """The haystack's words: the demo corpus's prose, digits left out (the answer is the only number)."""
    from data_pipeline.sources import demo_documents

    return [w for doc in demo_documents() for w in doc.split() if not any(c.isdigit() for c in w)]


def haystack(encode, words: list[str], start: int, budget: int) -> list[str]:
    """The longest run of words from `start` whose text takes at most `budget` tokens (binary search)."""
    lo, hi = 0, min(len(words) - start, budget)  # a word is at least one token
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(" " + " ".join(words[start:start + mid]))) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return words[start:start + lo]


def make_items(encode, lengths: list[int], depths: list[float], per_cell: int, seed: int) -> list[dict]:
    rng, words = random.Random(seed), filler_words()
    items = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_cell):
                numbers = rng.sample(range(1000, 10000), 4)  # the needle first, then three others
                needle = NEEDLE.format(numbers[0])
                choices = [f" {n}" for n in numbers]
                answer_tokens = max(len(encode(c)) for c in choices)
                budget = length - answer_tokens - len(encode(needle)) - len(encode(QUESTION)) - 2  # joins may merge
                if budget < 1:
                    raise ValueError(f"--lengths {length}: too short for the needle and the question")
                start = rng.randrange(len(words) // 2)
                hay = haystack(encode, words, start, budget)
                cut = round(depth * len(hay))
                prompt = (" ".join(hay[:cut]) + needle + (" " + " ".join(hay[cut:]) if hay[cut:] else "")
                          + QUESTION).lstrip()
                order = list(range(4))
                rng.shuffle(order)
                tokens = len(encode(prompt)) + answer_tokens
                if tokens > length:  # a join merged otherwise than measured: never seen; refuse rather than cut
                    raise ValueError(f"--lengths {length}: an item came out at {tokens} tokens")
                items.append({"prompt": prompt, "choices": [choices[i] for i in order], "answer": order.index(0),
                              "length": length, "tokens": tokens, "depth": depth})
    return items


def write_task(source: str, out_dir: str | Path, lengths: list[int], depths: list[float], per_cell: int = 4,
               seed: int = 0) -> list[dict]:
    from pretrain.hf.pretrained import open_source

    src = open_source(source)
    longest = src.model.max_sequence_length
    if max(lengths) > longest:
        raise ValueError(f"--lengths {max(lengths)}: {source} has max_sequence_length={longest}")
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths {depths}: each depth is a fraction of the haystack, 0..1")
    tok = src.tokenizer()
    items = make_items(lambda text: tok.encode(text).ids, lengths, depths, per_cell, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "needle.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (out / "needle.yaml").write_text(YAML.format(data=json.dumps(str((out / "needle.jsonl").resolve()))))
    return items


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pretrain.hf.needle", description=__doc__.splitlines()[0])
    p.add_argument("source", help="a run directory or an exported folder (its tokenizer sizes the prompts)")
    p.add_argument("out_dir", help="where needle.yaml and needle.jsonl go (lm-eval's --include_path)")
    p.add_argument("--lengths", type=int, nargs="+", required=True, help="tokens of prompt + answer")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--per-cell", type=int, default=4, help="items per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        items = write_task(args.source, args.out_dir, args.lengths, args.depths, args.per_cell, args.seed)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    print(json.dumps({"out_dir": args.out_dir, "items": len(items), "lengths": args.lengths, "depths": args.depths}))


if __name__ == "__main__":
    sys.exit(main())
