"""One input file (a *piece*) -> packed shards, resumable shard by shard.

A piece is read, tokenized and packed on its own, into full shards `{split}-{piece:05d}-{n:04d}.tar`
(n counts per split), and finishes with `pieces/{piece:05d}.json` listing them and
`pieces/{piece:05d}.rest.npz`: its *rest*, what did not fill a shard (the windows of its unfinished
shard and its last partial window), which the merge packs with the other pieces' rests
(data_pipeline/merge.py). The output depends only on the file and the build's settings, never on
which worker or array task builds it.

After each batch of records (256) in which a shard was finished, the piece records where it stands
in `pieces/{piece:05d}.partial.json`
(records read, each split's finished shards, the byte offset its unfinished shard has reached) and
`.partial.npz` (the tokens left in each packer: less than a block). A re-run after a crash skips the
records already packed, reopens the unfinished shards at their recorded offsets and goes on, so no
finished shard is written again, and the result is the same bytes as an uninterrupted build.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data_pipeline.config import DataConfig
from data_pipeline.pack import Packer
from data_pipeline.shards import ShardFile, ShardInfo, atomic_write, read_blocks, read_json, tmp_path, token_dtype
from data_pipeline.sources import DocumentReader
from data_pipeline.tokenizer import SEGMENT_CHARS, encode_document, special_ids

SPLITS = ("train", "heldout")
RECORDS_PER_BATCH = 256  # records tokenized per encode_batch call (fewer when they hold SEGMENT_CHARS)
VOCAB_MULTIPLE = 128  # embedding tables padded to a multiple of 128 run faster on tensor cores


def pad_vocab(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def is_heldout(text: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h < fraction * 2**64


def shard_path(out: Path, split: str, index: int, n: int) -> Path:
    """The n-th shard of a split of piece `index` (finished; `.tmp` beside it while being written)."""
    return out / f"{split}-{index:05d}-{n:04d}.tar"


def rest_path(out: Path, index: int) -> Path:
    return out / "pieces" / f"{index:05d}.rest.npz"


def windows_per_block(cfg: DataConfig, dtype: np.dtype) -> tuple[int, int]:
    """(windows per tar member, members per shard) for data.member_bytes and data.shard_bytes."""
    window_bytes = cfg.seq_len * dtype.itemsize
    per_member = max(1, cfg.member_bytes // window_bytes)
    return per_member, max(1, cfg.shard_bytes // (per_member * window_bytes))


class SplitWriter:
    """Takes full blocks out of a Packer and appends them to the split's current shard; `name(n)` is
    the path of the n-th shard this writer writes."""

    def __init__(self, name, packer: Packer, dtype: np.dtype, seq_len: int,
                 windows_per_member: int, members_per_shard: int, state: dict | None = None):
        self.name, self.packer = name, packer
        self.dtype, self.seq_len = dtype, seq_len
        self.windows_per_member, self.members_per_shard = windows_per_member, members_per_shard
        state = state or {"shards": [], "members": 0, "open": None}
        self.shards = [ShardInfo(**x) for x in state["shards"]]
        self.members = state["members"]
        self.file = None
        if state["open"]:
            self.file = ShardFile(self._path(), seq_len, **state["open"])

    def _path(self) -> Path:
        return self.name(len(self.shards))

    def drain(self, final: bool = False, keep: int = 0) -> bool:
        """Writes every full block, leaving `keep` full windows in the packer; with `final`, also the
        last partial block, and closes the shard. True when a shard was finished."""
        before = len(self.shards)
        while self.packer.full_windows() - keep >= self.windows_per_member:
            self._add(self.packer.take(self.windows_per_member, f"{self.members:08d}", self.dtype))
        if final:
            if self.packer.full_windows() > keep:
                self._add(self.packer.take(self.packer.full_windows() - keep, f"{self.members:08d}", self.dtype))
            if self.file:
                self._finish()
        return len(self.shards) > before

    def rest(self) -> Packer:
        """The windows of the unfinished shard (read back from it; the file is removed) followed by
        what is left in the packer."""
        rest = Packer(self.packer.seq_len, self.packer.eos_id)
        if self.file is not None:
            path = self.file.close_unfinished()
            for block in read_blocks(str(path), self.dtype, self.seq_len):
                rest.add_block(block)
            path.unlink()
            self.file = None
        rest.extend(self.packer.state())
        return rest

    def _add(self, block) -> None:
        if self.file is None:
            self.file = ShardFile(self._path(), self.seq_len)
        self.file.add(block)
        self.members += 1
        if self.file.blocks == self.members_per_shard:
            self._finish()

    def _finish(self) -> None:
        self.shards.append(self.file.finish())
        self.file = None

    def state(self) -> dict:
        open_shard = None
        if self.file:
            open_shard = {"offset": self.file.offset(), "windows": self.file.windows, "blocks": self.file.blocks}
        return {"shards": [asdict(x) for x in self.shards], "members": self.members, "open": open_shard}


def input_identity(path: str) -> dict:
    stat = os.stat(path) if os.path.isfile(path) else None
    return {"input": path, "input_size": stat.st_size if stat else 0, "input_mtime_ns": stat.st_mtime_ns if stat else 0}


def _partial_paths(out: Path, index: int) -> tuple[Path, Path]:
    return out / "pieces" / f"{index:05d}.partial.json", out / "pieces" / f"{index:05d}.partial.npz"


def _load_partial(out: Path, index: int, identity: dict, settings_id: str) -> tuple[dict, dict] | None:
    meta_path, arrays_path = _partial_paths(out, index)
    if not meta_path.is_file() or not arrays_path.is_file():
        return None
    meta = read_json(out, f"pieces/{meta_path.name}")
    if {k: meta[k] for k in identity} != identity or meta["settings"] != settings_id:
        return None  # the input or the settings changed: start the piece again
    with np.load(arrays_path, allow_pickle=False) as npz:
        if npz["records"].item() != meta["records"]:
            return None  # the two files are from different moments
        arrays = {s: {k: npz[f"{s}_{k}"] for k in ("tokens", "starts", "prompt")} for s in SPLITS}
    for split, state in meta["writers"].items():  # every file the state points at must still be there
        finished = [out / x["name"] for x in state["shards"]]
        if not all(f.is_file() for f in finished):
            return None
        if state["open"]:
            tmp = tmp_path(shard_path(out, split, index, len(finished)))
            if not tmp.is_file() or tmp.stat().st_size < state["open"]["offset"]:
                return None  # e.g. killed between finishing a shard and recording it: redo the input
    return meta, arrays


def _save_partial(out: Path, index: int, meta: dict, packers: dict[str, Packer]) -> None:
    meta_path, arrays_path = _partial_paths(out, index)
    arrays = {f"{s}_{k}": v for s, p in packers.items() for k, v in p.state().items()}
    tmp = arrays_path.with_name(arrays_path.name + ".tmp.npz")
    np.savez(tmp, records=np.array(meta["records"]), **arrays)
    os.replace(tmp, arrays_path)
    atomic_write(meta_path, json.dumps(meta))


def build_piece(index: int, path: str, cfg: DataConfig, tok: Tokenizer, settings_id: str, progress=None) -> dict:
    out = Path(cfg.dir)
    eos = special_ids(tok)["eos_id"]
    dtype = token_dtype(pad_vocab(tok.get_vocab_size()))
    per_member, per_shard = windows_per_block(cfg, dtype)
    identity = input_identity(path)
    resumed = _load_partial(out, index, identity, settings_id)
    meta, arrays = resumed if resumed else ({"records": 0, "tokens": 0, "too_long": 0, "max_prompt_len": 0,
                                              "writers": {}}, {})
    packers = {s: Packer(cfg.seq_len, eos) for s in SPLITS}
    for split, state in arrays.items():
        packers[split].restore(state)
    writers = {s: SplitWriter(lambda n, s=s: shard_path(out, s, index, n), packers[s], dtype, cfg.seq_len,
                              per_member, per_shard, meta["writers"].get(s)) for s in SPLITS}
    reader = DocumentReader(path, cfg.format, cfg.text_field, cfg.prompt_field, cfg.response_field,
                            cfg.on_decode_error)
    done_records = meta["records"]

    def flush(records: list) -> None:
        if cfg.format == "text":
            short = iter(tok.encode_batch([t for t in records if len(t) <= SEGMENT_CHARS], add_special_tokens=False))
            tokens = 0
            for text in records:  # a long document alone, a segment at a time
                ids = next(short).ids if len(text) <= SEGMENT_CHARS else encode_document(tok, text)
                packers["heldout" if is_heldout(text, cfg.heldout_fraction) else "train"].add_document(ids)
                tokens += len(ids) + 1
        else:
            prompts = tok.encode_batch([p for p, _ in records], add_special_tokens=False)
            responses = tok.encode_batch([r for _, r in records], add_special_tokens=False)
            tokens = 0
            for (p, r), pe, re_ in zip(records, prompts, responses, strict=True):
                split = "heldout" if is_heldout(p + "\0" + r, cfg.heldout_fraction) else "train"
                if packers[split].add_pair(pe.ids, re_.ids):
                    meta["max_prompt_len"] = max(meta["max_prompt_len"], len(pe.ids))
                    tokens += cfg.seq_len
                else:
                    meta["too_long"] += 1
        finished = [w.drain() for w in writers.values()]
        meta["records"] += len(records)
        meta["tokens"] += tokens
        if any(finished):  # a resume point: everything up to here is on disk or in the packers' rest
            meta.update(identity, settings=settings_id, writers={s: w.state() for s, w in writers.items()})
            _save_partial(out, index, meta, packers)
        if progress is not None:
            progress(tokens)

    batch: list = []
    chars = 0
    for n, record in enumerate(reader):
        if n < done_records:
            continue  # packed before the interruption (still read: the decode counts include it)
        batch.append(record)
        chars += len(record) if isinstance(record, str) else len(record[0]) + len(record[1])
        if len(batch) == RECORDS_PER_BATCH or chars >= SEGMENT_CHARS:
            flush(batch)
            batch, chars = [], 0
    flush(batch)
    rests = {s: w.rest().state() for s, w in writers.items()}
    tmp = rest_path(out, index).with_suffix(".tmp.npz")
    np.savez(tmp, **{f"{s}_{k}": v for s, rest in rests.items() for k, v in rest.items()})
    os.replace(tmp, rest_path(out, index))
    fragment = {"index": index, **identity, "settings": settings_id,
                "splits": {s: [asdict(x) for x in w.shards] for s, w in writers.items()},
                "rest": {s: len(rest["tokens"]) for s, rest in rests.items()}, "tokens": meta["tokens"],
                "documents": {**asdict(reader.counts), "too_long": meta["too_long"]},
                "max_prompt_len": meta["max_prompt_len"]}
    atomic_write(out / "pieces" / f"{index:05d}.json", json.dumps(fragment))
    for p in _partial_paths(out, index):
        p.unlink(missing_ok=True)
    return fragment


def piece_done(out: Path, index: int, path: str, settings_id: str) -> bool:
    """A piece is done when its fragment exists, matches the input file as it is now and the
    build's settings, and all its shards are on disk with their recorded sizes."""
    frag_path = out / "pieces" / f"{index:05d}.json"
    if not frag_path.is_file():
        return False
    frag = read_json(out, f"pieces/{index:05d}.json")
    if "rest" not in frag or not rest_path(out, index).is_file():
        return False  # an older build layout, or the rest is gone
    if {k: frag[k] for k in ("input", "input_size", "input_mtime_ns")} != input_identity(path):
        return False
    return frag["settings"] == settings_id and all(
        (out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"]
        for shards in frag["splits"].values() for s in shards)
