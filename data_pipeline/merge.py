"""The last step of a build: every piece's full shards and rests -> one set of shards + manifest.json.

Each piece (input file) leaves its full shards, named after it, and its *rest*: what did not fill a
shard (data_pipeline/piece.py). The merge, per split:
1. renames the full shards, in input order, to `{split}-{n:06d}.tar`, numbered from 0 without gaps;
2. packs the rests of all pieces, in input order, into the following shards, so small inputs share
   shards and only the last partial window of the split is dropped; a corpus becomes about
   size / data.shard_bytes shards;
3. when data.heldout_fraction > 0 and the held-out documents do not fill one window, moves the last
   window of train to held-out (with a warning), so the held-out split is never empty.
Everything depends only on the pieces, in input order, so the output is the same bytes for any
number of workers or array tasks.

The plan (which shard is renamed to what) is written to pieces/merge.json before the first rename,
so a merge that was interrupted is finished by running the build again; manifest.json is written
last, then the rests are removed. Once merged, a directory is finished: a re-run with the same
inputs returns its manifest, one with changed inputs is refused.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.config import DataConfig
from data_pipeline.confined import UnsafeFileError, inside
from data_pipeline.pack import Packer
from data_pipeline.piece import SPLITS, SplitWriter, input_identity, pad_vocab, piece_done, rest_path, windows_per_block
from data_pipeline.shards import (
    FORMAT_VERSION,
    SHARD_NAME,
    DataError,
    Manifest,
    ShardInfo,
    atomic_write,
    read_blocks,
    read_json,
    token_dtype,
)
from data_pipeline.tokenizer import fingerprint, special_ids

PLAN = "merge.json"

# Fewer held-out windows give no usable standard error of the held-out loss (pretrain.evaluate warns too).
MIN_HELDOUT_WINDOWS = 10


def final_name(split: str, n: int) -> str:
    return f"{split}-{n:06d}.tar"


def plan_path(out: Path) -> Path:
    return out / "pieces" / PLAN


def _fragments(out: Path, count: int) -> list[dict]:
    return [read_json(out, f"pieces/{i:05d}.json") for i in range(count)]


def _confined_names(out: Path, plan: dict) -> None:
    """The shard names a merge plan renames, reads or removes stay plain names inside `out`."""
    names = [n for pairs in plan["renames"].values() for pair in pairs for n in pair]
    names += [plan["demote"][1]] if plan.get("demote") else []
    for name in names:
        if not isinstance(name, str) or SHARD_NAME.fullmatch(name) is None:
            raise DataError(f"{plan_path(out)}: names {name!r}, not a shard of {out}; remove {out} and build again")
        try:
            inside(out, name)
        except UnsafeFileError as e:
            raise DataError(str(e)) from None


def make_plan(cfg: DataConfig, fragments: list[dict], settings_id: str) -> dict:
    L = cfg.seq_len
    rest_windows = {s: sum(f["rest"][s] for f in fragments) // L for s in SPLITS}
    full = {s: [(f["index"], x) for f in fragments for x in f["splits"][s]] for s in SPLITS}
    heldout_windows = sum(x["samples"] for _, x in full["heldout"]) + rest_windows["heldout"]
    borrow = cfg.heldout_fraction > 0 and heldout_windows == 0
    demote = None  # a full train shard whose windows join the rests: when they hold no window to move
    if borrow and rest_windows["train"] == 0 and full["train"]:
        demote = full["train"].pop()
    renames = {s: [[x["name"], final_name(s, n)] for n, (_, x) in enumerate(full[s])] for s in SPLITS}
    inputs = [{k: f[k] for k in ("input", "input_size", "input_mtime_ns")} for f in fragments]
    return {"settings": settings_id, "inputs": inputs,
            "renames": renames, "infos": {s: [x for _, x in full[s]] for s in SPLITS}, "borrow": borrow,
            "demote": [demote[0], demote[1]["name"]] if demote else None}


def check_inputs(out: Path, plan: dict, files: list[str]) -> None:
    """A merged directory serves exactly the inputs it was built from."""
    now = [input_identity(f) for f in files]
    if len(now) != len(plan["inputs"]):
        raise DataError(f"{out} holds a finished build of {len(plan['inputs'])} inputs, data.inputs now gives "
                        f"{len(now)}; point data.dir elsewhere or remove that directory")
    for before, after in zip(plan["inputs"], now, strict=True):
        if before != after:
            raise DataError(f"{out} holds a finished build, and its input {before['input']} changed since "
                            f"(size/mtime); point data.dir elsewhere or remove that directory")


def merge(cfg: DataConfig, files: list[str], tok: Tokenizer, settings_id: str, settings: dict) -> Manifest:
    """`settings`: the build settings the manifest records (build_config)."""
    out = Path(cfg.dir)
    if plan_path(out).is_file():
        plan = read_json(out, f"pieces/{PLAN}")
        if plan["settings"] != settings_id:
            raise DataError(f"{plan_path(out)} is a merge of other build settings; remove {out} and build again")
        check_inputs(out, plan, files)
        if (out / "manifest.json").is_file():
            _clean(out, plan)
            return Manifest.load(out)
        fragments = _fragments(out, len(files))
    else:
        missing = [f for i, f in enumerate(files) if not piece_done(out, i, f, settings_id)]
        if missing:
            raise DataError(f"{out}: {len(missing)} of {len(files)} inputs are not built yet (first: {missing[0]}); "
                            f"run the build (or the array tasks) again")
        fragments = _fragments(out, len(files))
        plan = make_plan(cfg, fragments, settings_id)
        atomic_write(plan_path(out), json.dumps(plan))
    _confined_names(out, plan)

    check_empty_inputs(fragments)
    ids = special_ids(tok)
    vocab = pad_vocab(tok.get_vocab_size())
    dtype = token_dtype(vocab)
    manifest = Manifest(FORMAT_VERSION, cfg.format, cfg.seq_len, vocab, tok.get_vocab_size(), dtype.str,
                        ids["eos_id"], ids["mask_id"], fingerprint(tok), 0, {s: [] for s in SPLITS},
                        build_config=settings)
    for split in SPLITS:
        for (src, dst), info in zip(plan["renames"][split], plan["infos"][split], strict=True):
            if (out / src).is_file():
                os.replace(out / src, out / dst)
            elif not (out / dst).is_file():
                raise DataError(f"{out / src} is missing (merge plan {plan_path(out)}); remove {out} and build again")
            manifest.splits[split].append(ShardInfo(**{**info, "name": dst}))

    borrowed = _pack_rests(cfg, out, plan, fragments, manifest, dtype)
    counts: dict[str, int] = {}
    for frag in fragments:
        for k, v in frag["documents"].items():
            counts[k] = counts.get(k, 0) + v
        manifest.max_prompt_len = max(manifest.max_prompt_len, frag["max_prompt_len"])
    manifest.documents = counts
    manifest.input_tokens = sum(f["tokens"] for f in fragments)
    if manifest.samples("train") == 0:
        moved = " once one is moved to the held-out split" if borrowed is not None else ""
        raise DataError(f"data.inputs={cfg.inputs}: no full window of data.seq_len={cfg.seq_len} tokens for "
                        f"train{moved} (documents: {counts})")
    if borrowed is not None:
        print(f"warning: the held-out documents ({borrowed} tokens, data.heldout_fraction={cfg.heldout_fraction}) "
              f"do not fill one window of {cfg.seq_len} tokens: the last window of train is the held-out split",
              file=sys.stderr, flush=True)
    heldout = manifest.samples("heldout")
    if 0 < heldout < MIN_HELDOUT_WINDOWS:  # found now, not at the first evaluation
        print(f"warning: the held-out split has {heldout} window(s) of {cfg.seq_len} tokens (data.heldout_fraction="
              f"{cfg.heldout_fraction}): too few for a standard error of the held-out loss; a larger "
              f"data.heldout_fraction gives more", file=sys.stderr, flush=True)
    manifest.save(out)
    _clean(out, plan)
    return manifest


def check_empty_inputs(fragments: list[dict]) -> None:
    """An input that gave no document (an empty .txt or .jsonl, a .jsonl of blank lines) is named: alone,
    in a one-line error; beside inputs that hold documents, in a one-line warning, and the build goes
    on (one empty file of thousands should not cost the build)."""
    empty = [f["input"] for f in fragments if f["tokens"] == 0]
    if not empty:
        return
    more = f" and {len(empty) - 1} more" if len(empty) > 1 else ""
    if len(empty) == len(fragments):
        raise DataError(f"{empty[0]}{more}: no document in the input (empty); nothing to build")
    print(f"warning: {empty[0]}{more}: no document in the input (empty); built from the other "
          f"{len(fragments) - len(empty)} input(s)", file=sys.stderr, flush=True)


def _pack_rests(cfg: DataConfig, out: Path, plan: dict, fragments: list[dict], manifest: Manifest,
                dtype: np.dtype) -> int | None:
    """Packs the rests into the shards after the renamed ones; with plan["borrow"], the last train
    window becomes the held-out split. Returns the held-out tokens left out then (None otherwise)."""
    L, eos = cfg.seq_len, manifest.eos_id
    per_member, per_shard = windows_per_block(cfg, dtype)
    borrowed_block, heldout_rest = None, 0
    for split in SPLITS:
        packer = Packer(L, eos)
        first = len(manifest.splits[split])
        writer = SplitWriter(lambda n, s=split, f=first: out / final_name(s, f + n), packer, dtype, L, per_member,
                             per_shard)
        keep = 1 if plan["borrow"] and split == "train" else 0
        if plan["borrow"] and split == "heldout":  # the held-out rests fill no window: the borrowed one instead
            heldout_rest = sum(f["rest"]["heldout"] for f in fragments)
            if borrowed_block is not None:
                packer.add_block(borrowed_block)
        else:
            for frag in fragments:
                if plan["demote"] and split == "train" and frag["index"] == plan["demote"][0]:
                    for block in read_blocks(str(out / plan["demote"][1]), dtype, L):
                        packer.add_block(block)  # the demoted shard came right before this piece's rest
                        writer.drain(keep=keep)
                with np.load(rest_path(out, frag["index"]), allow_pickle=False) as npz:
                    feed(writer, {k: npz[f"{split}_{k}"] for k in ("tokens", "starts", "prompt")}, keep)
        writer.drain(final=True, keep=keep)
        if keep and packer.full_windows():  # none: train is empty too, named by merge
            borrowed_block = packer.take(1, "00000000", dtype)
        manifest.dropped_tokens[split] = packer.length + heldout_rest * (split == "heldout")
        manifest.splits[split] += writer.shards
    return heldout_rest if plan["borrow"] else None


def feed(writer: SplitWriter, rest: dict[str, np.ndarray], keep: int) -> None:
    """Packs a rest (up to a shard of tokens) a block at a time, so the packer stays small: each take
    from it copies what it holds."""
    packer, L = writer.packer, writer.seq_len
    tokens, starts, prompt = rest["tokens"], rest["starts"], rest["prompt"]
    step = writer.windows_per_member * L
    for a in range(0, len(tokens), step):
        b = min(a + step, len(tokens))
        i0, i1 = np.searchsorted(starts, [a, b])
        packer.extend({"tokens": tokens[a:b], "starts": starts[i0:i1] - a, "prompt": prompt[a // L: b // L]})
        writer.drain(keep=keep)


def _clean(out: Path, plan: dict) -> None:
    """What the merged directory no longer needs: the rests, a demoted shard, stray unfinished shards."""
    for path in (out / "pieces").glob("*.rest.npz"):
        path.unlink()
    if plan["demote"]:
        (out / plan["demote"][1]).unlink(missing_ok=True)
    for path in out.glob("*.tar.tmp"):
        path.unlink()
