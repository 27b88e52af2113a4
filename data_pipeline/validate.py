"""Check every shard of a built corpus against its manifest.

    python -m data_pipeline.validate DIR

For each shard: present, of the recorded size and sha256, every block readable and passing its own
checksum, the recorded number of windows, token ids inside the vocabulary, document starts and
prompt lengths inside their windows. Prints one line per problem and a summary; exits 1 when any
shard fails, 2 when DIR holds no readable manifest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from data_pipeline.shards import DataError, Manifest, ShardInfo, digest_problem, digest_stream, open_shard, read_blocks


def check_shard(directory: Path, info: ShardInfo, manifest: Manifest) -> list[str]:
    path = directory / info.name
    try:  # through data_pipeline/confined.py: a name or link that leads out of DIR, or a FIFO, is not read
        with open_shard(directory, info.name) as f:
            problem = digest_problem(str(path), *digest_stream(f), info)
    except DataError as e:
        return [str(e)]
    problems = [problem] if problem else []
    windows = 0
    try:
        for block in read_blocks(str(path), np.dtype(manifest.dtype), manifest.seq_len,
                                 fileobj=open_shard(directory, info.name)):
            where = f"{path}: sample {block.key}"
            if block.first != windows:
                problems.append(f"{where} starts at window {block.first}, expected {windows}")
            if block.tokens.size and int(block.tokens.max()) >= manifest.vocab_size:
                problems.append(f"{where} has token id {int(block.tokens.max())} >= vocab_size {manifest.vocab_size}")
            if block.starts.size and int(block.starts.max()) >= block.tokens.size:
                problems.append(f"{where} has a document start past its windows")
            if block.prompt is not None and block.prompt.size and int(block.prompt.max()) >= manifest.seq_len:
                problems.append(f"{where} has a prompt length >= seq_len {manifest.seq_len}")
            windows += len(block.tokens)
    except DataError as e:
        return problems + [str(e)]
    if windows != info.samples:
        problems.append(f"{path}: {windows} windows, the manifest says {info.samples}")
    return problems


def validate(directory: str | Path) -> tuple[dict, list[str]]:
    directory = Path(directory)
    manifest = Manifest.load(directory)
    problems: list[str] = []
    checked = {}
    for split, shards in manifest.splits.items():
        for info in shards:
            problems += check_shard(directory, info, manifest)
        checked[split] = {"shards": len(shards), "windows": manifest.samples(split)}
    return checked, problems


def main(argv: list[str]) -> None:
    from data_pipeline.cli import parser

    p = parser("data_pipeline.validate", __doc__)
    p.add_argument("dir", help="a directory of shards with its manifest.json")
    directory = p.parse_args(argv).dir
    try:
        checked, problems = validate(directory)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for p in problems:
        print(p)
    print(json.dumps({"dir": directory, "ok": not problems, "problems": len(problems), **checked}))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
