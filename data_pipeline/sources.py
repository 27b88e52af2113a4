"""Where documents come from: files, folders and globs of .txt / .jsonl / .parquet, optionally
compressed (.gz, .zst), compressed text of any other name (one document, e.g. changelog.Debian.gz;
not .tar.gz archives), and the built-in demo corpus (`demo`: the English help text of the standard
library's `pydoc_data.topics`, 79 topics, ~465 KB).

A .txt file is one document; a .jsonl line is one record; a parquet row is one record. Text that is
not valid UTF-8 is replaced (U+FFFD) or skipped, per data.on_decode_error, and counted; any other
malformed input is an error naming the file and line.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.shards import DataError

DEMO = "demo"
FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = ("", ".gz", ".zst")


def demo_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [unwrap(topics[name]) for name in sorted(topics)]


def unwrap(text: str) -> str:
    """Joins the hard-wrapped lines of each prose paragraph into one line. The pydoc text breaks
    lines at ~70 characters, so a newline follows every ~12th word; a tiny model then spends its
    capacity on where the newlines go, and its samples are mostly newlines. Indented paragraphs (code,
    grammar) and headings (a line of *, = or -) keep their lines."""
    paragraphs = text.split("\n\n")
    out = []
    for p in paragraphs:
        lines = p.split("\n")
        verbatim = any(line[:1].isspace() or (line and set(line) <= set("*=-")) for line in lines)
        out.append(p if verbatim else " ".join(line.strip() for line in lines))
    return "\n\n".join(out)


ARCHIVES = (".tar.gz", ".tgz", ".tar.zst")  # many files in one: not a document


def _known(path: str) -> bool:
    """A format's extension, optionally compressed; or compressed text of any name (Debian's
    changelog.Debian.gz), read as one text document."""
    if any(path.endswith(f + c) for f in FORMATS for c in COMPRESSIONS):
        return True
    return path.endswith(COMPRESSIONS[1:]) and not path.endswith(ARCHIVES)


def resolve_inputs(inputs: list[str]) -> list[str]:
    """data.inputs -> an ordered list of files (and `demo`). Folders are searched recursively; every
    entry must match at least one readable input, so a typo fails before any work."""
    if not inputs:
        raise DataError("data.inputs is empty: give files, folders or globs of .txt/.jsonl/.parquet")
    found: list[str] = []
    for entry in inputs:
        if entry == DEMO:
            matches = [DEMO]
        elif os.path.isdir(entry):
            matches = sorted(str(p) for p in Path(entry).rglob("*") if p.is_file() and _known(str(p)))
        elif os.path.isfile(entry):
            if not _known(entry):
                raise DataError(f"data.inputs: {entry} is not .txt/.jsonl/.parquet (optionally .gz/.zst) nor "
                                f"compressed text (.gz/.zst of any other name)")
            matches = [entry]
        else:
            matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p) and _known(p))
        if not matches:
            raise DataError(f"data.inputs: {entry!r} matches no .txt/.jsonl/.parquet file, nor .gz/.zst text "
                            f"(missing or empty)")
        found += [m for m in matches if m not in found]
    return found


@dataclass
class DecodeCounts:
    documents: int = 0
    replaced: int = 0  # documents with invalid UTF-8 replaced by U+FFFD
    skipped: int = 0  # documents with invalid UTF-8 left out


class ZstdFile(io.RawIOBase):
    """A .zst file read as a stream of frames. Unlike zstandard's stream_reader, which ends quietly
    where a truncated file ends, a file that stops inside a frame raises EOFError."""

    def __init__(self, path: str):
        import zstandard

        self.new_frame = zstandard.ZstdDecompressor().decompressobj
        self.fh, self.frame, self.in_frame = open(path, "rb"), self.new_frame(), False
        self.pending, self.pos = b"", 0  # decompressed bytes not yet handed out: pending[pos:]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.pos == len(self.pending):
            data = self.fh.read(1 << 20)
            if not data:
                if self.in_frame:
                    raise EOFError("zstd data ended inside a frame (the file is truncated)")
                return 0
            out = []
            while data:
                out.append(self.frame.decompress(data))
                self.in_frame = not self.frame.eof
                data = b""
                if not self.in_frame:  # the next frame, if any, starts in what this one left over
                    data, self.frame = self.frame.unused_data, self.new_frame()
            self.pending, self.pos = b"".join(out), 0
        n = min(len(buffer), len(self.pending) - self.pos)
        buffer[:n] = self.pending[self.pos: self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        self.fh.close()
        super().close()


def _open(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(ZstdFile(path), buffer_size=1 << 20)
    return open(path, "rb")


def _read_errors(path: str) -> tuple[type[BaseException], ...]:
    """What reading a damaged (truncated, corrupt) file of this kind raises."""
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
    if path.endswith(".zst"):
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


class DocumentReader:
    """Iterates the records of one input: str documents (format=text) or (prompt, response) pairs
    (format=sft)."""

    def __init__(self, path: str, fmt: str, text_field: str, prompt_field: str, response_field: str,
                 on_decode_error: str):
        self.path, self.fmt, self.on_decode_error = path, fmt, on_decode_error
        self.fields = [text_field] if fmt == "text" else [prompt_field, response_field]
        self.counts = DecodeCounts()

    def __iter__(self) -> Iterator[str | tuple[str, str]]:
        try:
            yield from self._records()
        except _read_errors(self.path) as e:  # a truncated .gz/.zst, a file that vanished or cannot be read
            raise DataError(f"{self.path}: unreadable, truncated or corrupt ({type(e).__name__}: {e})") from None

    def _records(self) -> Iterator[str | tuple[str, str]]:
        if self.path == DEMO:
            if self.fmt != "text":
                raise DataError("data.inputs=[demo] is a text corpus; data.format=sft needs prompt/response records")
            yield from self._counted(demo_documents())
        elif ".jsonl" in Path(self.path).name:
            yield from self._jsonl()
        elif ".parquet" in Path(self.path).name:
            yield from self._parquet()
        else:  # .txt, or compressed text of another name
            with _open(self.path) as f:
                text = self._decode(f.read())
            if text:  # an empty file is no document (not one of zero tokens)
                yield from self._counted([text])

    def _counted(self, records):
        for r in records:
            self.counts.documents += 1
            yield r

    def _decode(self, raw: bytes) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if self.on_decode_error == "skip":
                self.counts.skipped += 1
                return None
            self.counts.replaced += 1
            return raw.decode("utf-8", errors="replace")

    def _record(self, values: list, where: str):
        for name, value in zip(self.fields, values, strict=True):
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} is {type(value).__name__}, not a string")
        self.counts.documents += 1
        return values[0] if self.fmt == "text" else (values[0], values[1])

    def _jsonl(self):
        with _open(self.path) as f:
            for number, raw in enumerate(f, start=1):
                where = f"{self.path}:{number}"
                line = self._decode(raw)
                if line is None or not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                missing = [k for k in self.fields if not isinstance(record, dict) or k not in record]
                if missing:
                    raise DataError(f"{where}: no field {missing[0]!r} (set data.text_field / data.prompt_field)")
                yield self._record([record[k] for k in self.fields], where)

    def _parquet(self):
        import pyarrow.parquet as pq

        source = self.path if self.path.endswith(".parquet") else io.BytesIO(_open(self.path).read())
        try:
            table = pq.ParquetFile(source)
        except Exception as e:  # pyarrow raises its own error types for a damaged file
            raise DataError(f"{self.path}: not a readable parquet file ({e})") from None
        missing = [k for k in self.fields if k not in table.schema_arrow.names]
        if missing:
            raise DataError(f"{self.path}: no column {missing[0]!r} (columns: {table.schema_arrow.names})")
        row = 0
        for batch in table.iter_batches(columns=self.fields, batch_size=4096):
            columns = [batch.column(k).to_pylist() for k in self.fields]
            for values in zip(*columns, strict=True):
                row += 1
                where = f"{self.path}: row {row}"
                values = [self._decode(v) if isinstance(v, bytes) else v for v in values]
                if any(v is None for v in values) and self.on_decode_error == "skip":
                    continue
                yield self._record(values, where)
