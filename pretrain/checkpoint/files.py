"""Files of a checkpoint: durable writes, digests, and checking a directory against its manifest.

No DeepSpeed and no process group here: pure file work, so it can be tested alone and used by
tools that only read checkpoints. A digest is the size and the SHA-256 of a file: the size catches
truncation without reading, the hash catches a flipped byte (torch.load does not check zip CRCs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from pretrain.checkpoint import ds_names

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line that names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (a full disk...): the earlier ones are intact."""


def fsync_dir(directory: Path) -> None:
    """Makes a rename or a new file in `directory` durable (the directory entry itself)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Writes `path` so that a reader sees the old content or the whole new one, never a part:
    a temporary file next to it, fsync, rename over, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def digest(path: Path, sync: bool = False) -> dict:
    """{"size", "sha256"} of a file; with sync, also forces the file's data to disk."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        size = os.fstat(f.fileno()).st_size
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return {"size": size, "sha256": h.hexdigest()}


_OUR_RANK_FILE = re.compile(r"^trainer_state_rank(\d+)\.json$")


def owner_rank(name: str) -> int:
    """The rank that wrote a file of DeepSpeed's layout (zero_pp_rank_R_..., bf16_zero_pp_rank_R_...)
    or ours (trainer_state_rankR.json); files with no rank in their name are rank 0's."""
    if (rank := ds_names.rank_of(name)) is not None:
        return rank
    if m := _OUR_RANK_FILE.match(name):
        return int(m.group(1))
    return 0


def files_of_rank(directory: Path, rank: int) -> list[str]:
    """The files in `directory` (recursively, as relative paths) that `rank` wrote."""
    out = []
    for path in sorted(directory.rglob("*")):
        if path.is_file() and owner_rank(path.name) == rank and path.name != MANIFEST:
            out.append(str(path.relative_to(directory)))
    return out


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a one-line CheckpointError naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {what} does not parse ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def read_manifest(directory: Path) -> dict:
    manifest = read_json(directory / MANIFEST, "the checkpoint manifest")
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"{directory / MANIFEST}: the checkpoint manifest lacks 'files' or 'step'")
    return manifest


def check_sizes(directory: Path, manifest: dict) -> str | None:
    """The first missing or wrongly sized file, as a one-line problem, or None. Cheap: stat only."""
    for name, want in sorted(manifest["files"].items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path}: missing (the manifest lists it)"
        if size != want["size"]:
            return f"{path}: {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
    return None


def check_hashes(directory: Path, names: list[str], manifest: dict) -> str | None:
    """The first of `names` whose content differs from the manifest, as a one-line problem, or None."""
    for name in names:
        path = directory / name
        try:
            got = digest(path)
        except OSError as e:
            return f"{path}: cannot be read ({e.strerror or e})"
        if got != manifest["files"][name]:
            return f"{path}: content differs from the manifest's checksum (damaged file)"
    return None
