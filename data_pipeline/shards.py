"""The shard format and its manifest.

A shard is a webdataset tar: one member `{key}.tokens` per packed window, the window's token ids as
raw little-endian integers (uint16 when the vocabulary fits, else uint32). Nothing is pickled, so
reading a shard never runs code from it. `manifest.json` beside the shards lists every shard with
its sample count, token count and sha256, and the facts a trainer must agree with (seq_len,
vocabulary, special ids, tokenizer fingerprint).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MEMBER_SUFFIX = "tokens"


class DataError(ValueError):
    """Shards, a manifest or a data state that cannot serve the run; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


@dataclass
class ShardInfo:
    name: str
    samples: int
    tokens: int
    sha256: str


@dataclass
class Manifest:
    format_version: int
    seq_len: int
    vocab_size: int
    dtype: str
    eos_id: int
    mask_id: int
    tokenizer_fingerprint: str
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    build_config: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Identifies the data a stream reads: a resume on other data must not pass as this one."""
        facts = [self.seq_len, self.vocab_size, self.tokenizer_fingerprint,
                 {s: [x.sha256 for x in shards] for s, shards in sorted(self.splits.items())}]
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]

    def samples(self, split: str) -> int:
        return sum(s.samples for s in self.splits[split])

    def save(self, directory: Path) -> None:
        tmp = directory / "manifest.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, directory / "manifest.json")  # never a half-written manifest

    @staticmethod
    def load(directory: str | Path) -> Manifest:
        path = Path(directory) / "manifest.json"
        if not path.is_file():
            raise DataError(f"no manifest.json in {directory} (build shards with python -m data_pipeline.build)")
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path}: format_version={raw.get('format_version')} is not {FORMAT_VERSION}")
        raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
        return Manifest(**raw)


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # fixed header fields: the same input gives byte-identical shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_shard(path: Path, windows: np.ndarray, first_key: int) -> ShardInfo:
    """windows [N, seq_len] -> one tar; written to a temporary name, then renamed into place."""
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, window in enumerate(windows):
            _tar_member(tar, f"{first_key + i:012d}.{MEMBER_SUFFIX}", window.tobytes())
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, path)
    return ShardInfo(path.name, int(windows.shape[0]), int(windows.size), digest)


def decode_sample(sample: dict, dtype: np.dtype, seq_len: int) -> np.ndarray:
    """A webdataset sample dict -> token ids, without pickle; names the sample when it is malformed."""
    payload = sample.get(MEMBER_SUFFIX)
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    if not isinstance(payload, (bytes, bytearray)):
        raise DataError(f"{where} has no '.{MEMBER_SUFFIX}' member (members: {sorted(sample)})")
    if len(payload) != seq_len * dtype.itemsize:
        raise DataError(f"{where} holds {len(payload)} bytes, expected {seq_len} tokens of {dtype}")
    return np.frombuffer(payload, dtype=dtype)
