"""Build shards: documents -> tokens (+EOS each) -> one stream cut into seq_len windows -> tars.

    python -m data_pipeline.build data=demo trainer.seq_len=256 data.dir=outputs/data/demo-256

Packing follows the paper: documents are concatenated and chunked with no attention mask between
them; the incomplete last window is dropped. The last `heldout_fraction` of windows forms the
held-out split. The result is the same bytes on every run for the same inputs.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from data_pipeline.config import DataConfig, compose
from data_pipeline.shards import FORMAT_VERSION, DataError, Manifest, token_dtype, write_shard
from data_pipeline.sources import load_documents
from data_pipeline.tokenizer import fingerprint, load_tokenizer, special_ids, train_bpe

VOCAB_MULTIPLE = 128  # embedding tables padded to a multiple of 128 run faster on tensor cores


def pad_vocab(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int) -> np.ndarray:
    """Concatenate the documents, each followed by EOS, and cut into [N, seq_len] windows."""
    flat = np.fromiter((t for doc in token_lists for t in (*doc, eos_id)), dtype=np.int64)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def build(cfg: DataConfig) -> Manifest:
    out = Path(cfg.dir)
    if cfg.seq_len <= 0:
        raise DataError(f"data.seq_len={cfg.seq_len} must be positive")
    documents = load_documents(cfg.source)
    if not documents:
        raise DataError(f"data.source={cfg.source!r} yielded no documents")
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_bpe(documents, cfg.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    ids = special_ids(tok)

    start = time.perf_counter()
    windows = pack([e.ids for e in tok.encode_batch(documents)], ids["eos_id"], cfg.seq_len)
    if len(windows) < 2:
        raise DataError(f"data.source={cfg.source!r} has too few tokens for two windows of data.seq_len={cfg.seq_len}")
    vocab = pad_vocab(tok.get_vocab_size())
    windows = windows.astype(token_dtype(vocab))
    n_heldout = max(1, int(round(len(windows) * cfg.heldout_fraction))) if cfg.heldout_fraction > 0 else 0
    splits = {"train": windows[: len(windows) - n_heldout], "heldout": windows[len(windows) - n_heldout:]}

    per_shard = max(1, cfg.shard_bytes // (cfg.seq_len * windows.dtype.itemsize))
    manifest = Manifest(FORMAT_VERSION, cfg.seq_len, vocab, windows.dtype.str, ids["eos_id"], ids["mask_id"],
                        fingerprint(tok), build_config={k: v for k, v in asdict(cfg).items() if k != "dir"})
    key = 0
    for split, rows in splits.items():
        manifest.splits[split] = []
        for i, first in enumerate(range(0, len(rows), per_shard)):
            part = rows[first: first + per_shard]
            manifest.splits[split].append(write_shard(out / f"{split}-{i:06d}.tar", part, key))
            key += len(part)
    manifest.save(out)
    seconds = time.perf_counter() - start
    print(json.dumps({"dir": str(out), "windows": int(len(windows)), "tokens": int(windows.size),
                      "vocab_size": vocab, "shards": {s: len(v) for s, v in manifest.splits.items()},
                      "tokens_per_s": round(windows.size / max(seconds, 1e-9))}), file=sys.stderr)
    return manifest


BUILD_KEYS = ("source", "tokenizer", "vocab_size", "seq_len", "heldout_fraction")  # what decides the content


def check_built_with(manifest: Manifest, cfg: DataConfig) -> None:
    """Shards built with other settings than the run asks for are an error, not a silent reuse."""
    for key in BUILD_KEYS:
        built = manifest.build_config.get(key)
        if built != getattr(cfg, key):
            raise DataError(f"{cfg.dir} was built with data.{key}={built!r}, this run has data.{key}="
                             f"{getattr(cfg, key)!r}; point data.dir elsewhere or remove that directory")


def ensure_built(cfg: DataConfig) -> Manifest:
    """The manifest of cfg.dir; the built-in demo corpus is built on first use, anything else must
    have been built beforehand."""
    if (Path(cfg.dir) / "manifest.json").is_file() or cfg.source != "demo":
        manifest = Manifest.load(cfg.dir)
        check_built_with(manifest, cfg)
        return manifest
    staging = Path(cfg.dir + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    build(DataConfig(**{**asdict(cfg), "dir": str(staging)}))
    staging.rename(cfg.dir)  # appears whole or not at all
    return Manifest.load(cfg.dir)


def data_config(cfg) -> DataConfig:
    data = OmegaConf.to_container(cfg.data, resolve=True)  # interpolations point outside `data`
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), data))


def main(argv: list[str]) -> None:
    try:
        build(data_config(compose(argv)))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
