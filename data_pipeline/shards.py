"""The shard format and its manifest.

A shard is a webdataset tar. Each sample (tar member group) is a *block* of consecutive packed
windows, so a reader handles a few large members instead of millions of tiny ones:

    {key}.tokens   [n, seq_len] token ids, raw little-endian (uint16 when the vocabulary fits, else uint32)
    {key}.starts   uint32 positions (in the block's flattened tokens) where a document begins
    {key}.prompt   uint32 [n] prompt length of each window (format=sft only)
    {key}.json     {"windows": n, "first": i, "crc32": c}: the block holds windows i..i+n-1 of the shard;
                   c is the crc32 of the other members, in the order above

Nothing is pickled, and a reader accepts only these members, so reading a shard never runs code
from it. `manifest.json` beside the shards lists every shard (samples, tokens, bytes, sha256) and the
facts a trainer must agree with (seq_len, vocabulary, special ids, tokenizer fingerprint).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.confined import UnsafeFileError, open_regular, read_capped

FORMAT_VERSION = 2
MEMBERS = ("tokens", "starts", "prompt", "json")
MANIFEST_MAX_BYTES = 256 << 20  # about a million shard entries; a larger manifest.json is not one of ours
# A shard's name in the manifest: relative, plain segments (no `..`, no leading dot), no character a
# shell or a URL template ("pipe:cat {dir}/{name}") would read as anything but a name.
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*")


class DataError(ValueError):
    """Inputs, shards, a manifest or a data state that cannot serve the run; the message names the file."""


class CorruptShardError(DataError):
    """A shard member that is truncated, unreadable or fails its checksum."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


@dataclass
class ShardInfo:
    name: str  # relative to the manifest's directory
    samples: int  # windows
    tokens: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    format_version: int
    format: str  # text | sft
    seq_len: int
    vocab_size: int  # padded to a multiple of 128
    tokenizer_vocab_size: int  # before padding
    dtype: str
    eos_id: int
    mask_id: int
    tokenizer_fingerprint: str
    max_prompt_len: int  # 0 for format=text
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    totals: dict[str, dict] = field(default_factory=dict)
    documents: dict[str, int] = field(default_factory=dict)  # read, replaced, skipped, too_long
    build_config: dict = field(default_factory=dict)
    input_tokens: int = 0  # tokens of every document read, EOS included (format=sft: of every window)
    dropped_tokens: dict[str, int] = field(default_factory=dict)  # per split: the last partial window

    def fingerprint(self) -> str:
        """Identifies the data a stream reads: a resume on other data must not pass as this one."""
        facts = [self.seq_len, self.vocab_size, self.tokenizer_fingerprint,
                 {s: [x.sha256 for x in shards] for s, shards in sorted(self.splits.items())}]
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]

    def samples(self, split: str) -> int:
        return sum(s.samples for s in self.splits[split])

    def save(self, directory: Path) -> None:
        self.totals = {s: {"shards": len(v), "samples": sum(x.samples for x in v), "tokens": sum(x.tokens for x in v),
                           "bytes": sum(x.bytes for x in v)} for s, v in self.splits.items()}
        atomic_write(Path(directory) / "manifest.json", json.dumps(asdict(self), indent=1))

    @staticmethod
    def load(directory: str | Path) -> Manifest:
        path = Path(directory) / "manifest.json"
        raw = read_manifest(directory)
        if raw.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path}: format_version={raw.get('format_version')!r} is not {FORMAT_VERSION}; "
                            f"rebuild the shards")
        try:
            raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
            manifest = Manifest(**raw)
        except (TypeError, KeyError, AttributeError) as e:
            raise DataError(f"{path}: not a valid manifest ({type(e).__name__}: {e})") from None
        for split, infos in manifest.splits.items():
            for i, info in enumerate(infos):
                if not (isinstance(info.name, str) and SHARD_NAME.fullmatch(info.name)
                        and all(type(getattr(info, k)) is int and getattr(info, k) >= 0
                                for k in ("samples", "tokens", "bytes")) and isinstance(info.sha256, str)):
                    raise DataError(f"{path}: shard {i} of split {split!r} is not a valid entry (name {info.name!r}: "
                                    f"a relative path of letters, digits and _ . + -, with sizes as whole numbers)")
        return manifest


def read_manifest(directory: str | Path) -> dict:
    """manifest.json's JSON object: a regular file inside `directory`, read up to MANIFEST_MAX_BYTES. A
    missing, truncated or foreign file is one DataError naming it, never a traceback or its content."""
    path = Path(directory) / "manifest.json"
    try:
        raw = json.loads(read_capped(directory, "manifest.json", MANIFEST_MAX_BYTES))
    except FileNotFoundError:
        raise DataError(f"no manifest.json in {directory} (build shards with python -m data_pipeline.build)") from None
    except UnsafeFileError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or type(e).__name__})") from None
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError: truncated or not JSON
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(f"{path}: not a valid manifest (not JSON{where}: truncated or damaged); rebuild the "
                        f"shards, or for the demo corpus remove {directory}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a valid manifest (a JSON {type(raw).__name__}, not an object)")
    return raw


BOOKKEEPING_MAX_BYTES = 256 << 20


def read_json(root: str | Path, name: str):
    """A build's own bookkeeping file under `root` (pieces/*.json, merge.json, build.json), read like any
    file in a data directory (data_pipeline/confined.py): inside `root`, regular, capped; a truncated
    one is a DataError naming it."""
    try:
        return json.loads(read_capped(root, name, BOOKKEEPING_MAX_BYTES))
    except UnsafeFileError as e:
        raise DataError(str(e)) from None
    except ValueError:
        raise DataError(f"{Path(root) / name}: not valid JSON (truncated or damaged); remove {root} and build "
                        f"again") from None


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # never a half-written file


# -- writing ------------------------------------------------------------------------------------
@dataclass
class Block:
    key: str
    tokens: np.ndarray  # [n, seq_len]
    starts: np.ndarray  # uint32 document starts in tokens.ravel()
    prompt: np.ndarray | None  # uint32 [n]
    first: int = 0  # index of the first window in its shard

    def start_rows(self) -> np.ndarray:
        """[n, seq_len] bool: True where a document begins (`starts`, per window)."""
        rows = np.zeros(self.tokens.shape, dtype=bool)
        window, column = np.divmod(self.starts.astype(np.int64), self.tokens.shape[1])
        rows[window, column] = True
        return rows


def _payloads(block: Block) -> list[tuple[str, bytes]]:
    parts = [("tokens", block.tokens.tobytes()), ("starts", block.starts.astype("<u4").tobytes())]
    if block.prompt is not None:
        parts.append(("prompt", block.prompt.astype("<u4").tobytes()))
    crc = 0
    for _, payload in parts:
        crc = zlib.crc32(payload, crc)
    return parts + [("json", json.dumps({"windows": len(block.tokens), "first": block.first, "crc32": crc}).encode())]


def _tar_member(name: str, payload: bytes) -> bytes:
    """One USTAR member: header, payload, padding to 512 bytes. Fixed header fields (mtime 0, mode
    644, no owner), so the same blocks give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT) + payload + b"\0" * (-len(payload) % tarfile.BLOCKSIZE)


def tmp_path(path: Path) -> Path:
    """Where a shard is written until it is finished."""
    return path.with_name(path.name + ".tmp")


class ShardFile:
    """A shard written block by block into `<name>.tmp` and renamed into place when finished, so a
    shard is whole or absent. An unfinished one can be reopened at a byte offset where a block ended
    (the build's resume point) and continued."""

    def __init__(self, path: Path, seq_len: int, offset: int = 0, windows: int = 0, blocks: int = 0):
        self.path, self.tmp, self.seq_len = path, tmp_path(path), seq_len
        self.windows, self.blocks = windows, blocks
        if offset:
            self.fh = open(self.tmp, "r+b")
            self.fh.truncate(offset)
            self.fh.seek(offset)
        else:
            self.fh = open(self.tmp, "wb")

    def add(self, block: Block) -> None:
        block.first = self.windows
        for suffix, payload in _payloads(block):
            self.fh.write(_tar_member(f"{block.key}.{suffix}", payload))
        self.windows += len(block.tokens)
        self.blocks += 1

    def offset(self) -> int:
        self.fh.flush()
        os.fsync(self.fh.fileno())  # the resume point must be on disk before it is recorded
        return self.fh.tell()

    def close_unfinished(self) -> Path:
        """Ends the archive and closes the file without putting it in place; returns the `.tmp` path."""
        self.fh.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self.fh.close()
        return self.tmp

    def finish(self) -> ShardInfo:
        self.fh.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end of archive
        self.fh.close()
        data = self.tmp.read_bytes()
        os.replace(self.tmp, self.path)
        return ShardInfo(self.path.name, self.windows, self.windows * self.seq_len, len(data),
                         hashlib.sha256(data).hexdigest())


# -- reading ------------------------------------------------------------------------------------
def open_url(url: str):
    """A local path, or a webdataset URL such as `pipe:aws s3 cp s3://bucket/shard.tar -`."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb", buffering=1 << 20)


def open_shard(directory: str | Path, name: str):
    """A shard listed in a manifest, opened for reading through data_pipeline/confined.py: inside the
    real path of `directory` and a regular file (a FIFO or /dev/zero planted under its name is refused at
    once); a DataError naming it otherwise."""
    try:
        f = open_regular(directory, name)
    except FileNotFoundError:
        raise DataError(f"{Path(directory) / name}: missing (listed in manifest.json)") from None
    except UnsafeFileError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"{Path(directory) / name}: unreadable ({e.strerror or type(e).__name__})") from None
    return io.BufferedReader(f.detach(), buffer_size=1 << 20)


def check_shard_files(directory: str | Path, manifest: Manifest, digests: bool, on_corrupt: str = "error") -> None:
    """Before a run reads anything: every shard the manifest lists is a regular file inside `directory`
    of the size the manifest says; with `digests`, also of its sha256 (the demo corpus: a few MB, so a
    valid shard copied over another is refused at start, not when the stream first reaches it). One
    DataError naming the first shard at fault. A file that must not be read (outside the directory,
    not a regular file) is refused whatever data.on_corrupt says; a damaged or missing one only with
    on_corrupt=error (with skip, the stream leaves it out and says so)."""
    for infos in manifest.splits.values():
        for info in infos:
            where = Path(directory) / info.name
            if on_corrupt == "skip" and not os.path.lexists(where):
                continue
            with open_shard(directory, info.name) as f:
                size = os.fstat(f.fileno()).st_size
                sha = digest_stream(f)[1] if digests and size == info.bytes else None
            problem = digest_problem(str(where), size, sha, info) if sha else (
                None if size == info.bytes else f"{where}: {size} bytes, the manifest says {info.bytes} bytes "
                                                f"(damaged, truncated, or another shard copied over it)")
            if problem and on_corrupt != "skip":
                raise CorruptShardError(problem)


def digest_stream(f, into=None) -> tuple[int, str]:
    """(size, sha256) of what `f` yields to its end, read in chunks; each chunk is also written to `into`."""
    h, size = hashlib.sha256(), 0
    while chunk := f.read(8 << 20):
        h.update(chunk)
        size += len(chunk)
        if into is not None:
            into.write(chunk)
    return size, h.hexdigest()


def digest_problem(where: str, size: int, sha256: str, info: ShardInfo) -> str | None:
    """One line when a shard is not the one the manifest lists (damaged, truncated, or another shard
    copied over it), else None."""
    if size == info.bytes and sha256 == info.sha256:
        return None
    return (f"{where}: {size} bytes, sha256 {sha256[:16]}.., the manifest says {info.bytes} bytes, sha256 "
            f"{info.sha256[:16]}.. (damaged, or another shard copied over it)")


def decode_block(url: str, key: str, members: dict[str, bytes], dtype: np.dtype, seq_len: int) -> Block:
    """One tar member group -> a Block, checked against its own header; never unpickles anything."""
    where = f"{url}: sample {key}"
    unexpected = sorted(set(members) - set(MEMBERS))
    if unexpected:
        raise CorruptShardError(f"{where} has unexpected member(s) {unexpected}; shard members are only "
                                f"{list(MEMBERS)} and are never unpickled")
    if "tokens" not in members or "json" not in members or "starts" not in members:
        raise CorruptShardError(f"{where} lacks a member (has {sorted(members)}): truncated or not our format")
    try:
        header = json.loads(members["json"])
        n, first, crc = int(header["windows"]), int(header["first"]), int(header["crc32"])
    except (ValueError, KeyError, TypeError):
        raise CorruptShardError(f"{where}: unreadable .json header") from None
    actual = 0
    for name in ("tokens", "starts", "prompt"):
        if name in members:
            actual = zlib.crc32(members[name], actual)
    if actual != crc or len(members["tokens"]) != n * seq_len * dtype.itemsize:
        raise CorruptShardError(f"{where} fails its checksum or size ({len(members['tokens'])} token bytes, "
                                f"expected {n} windows of {seq_len} {dtype})")
    tokens = np.frombuffer(members["tokens"], dtype=dtype).reshape(n, seq_len)
    prompt = np.frombuffer(members["prompt"], dtype="<u4") if "prompt" in members else None
    return Block(key, tokens, np.frombuffer(members["starts"], dtype="<u4"), prompt, first)


def read_blocks(url: str, dtype: np.dtype, seq_len: int, on_corrupt: str = "error",
                skipped: list[str] | None = None, fileobj=None) -> Iterator[Block]:
    """The blocks of one shard, in order. A corrupt block raises CorruptShardError naming the shard
    and sample, or with on_corrupt="skip" is left out and its key appended to `skipped`; a truncated
    tar ends the shard the same way. A damaged tar header is not the end of the archive (tarfile's
    default): the reader moves on to the next valid header, so only that block is lost. `fileobj`:
    the shard's bytes already at hand (read from `url` and checked); closed at the end."""
    group: dict[str, bytes] = {}
    key = None
    stream = fileobj if fileobj is not None else open_url(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|", ignore_zeros=True) as tar:
            for member in tar:
                stem, _, suffix = member.name.partition(".")
                if stem != key and group:
                    yield from _checked(url, key, group, dtype, seq_len, on_corrupt, skipped)
                    group = {}
                key = stem
                f = tar.extractfile(member)
                group[suffix] = f.read() if f is not None else b""
            if group:
                yield from _checked(url, key, group, dtype, seq_len, on_corrupt, skipped)
    except (tarfile.TarError, EOFError, OSError) as e:
        error = CorruptShardError(f"{url}: unreadable after sample {key} ({type(e).__name__}: {e})")
        if on_corrupt != "skip":
            raise error from None
        if skipped is not None:
            skipped.append(f"{key}+rest")
    finally:
        stream.close()


def _checked(url, key, group, dtype, seq_len, on_corrupt, skipped):
    try:
        yield decode_block(url, key, group, dtype, seq_len)
    except CorruptShardError:
        if on_corrupt != "skip":
            raise
        if skipped is not None:
            skipped.append(key)
