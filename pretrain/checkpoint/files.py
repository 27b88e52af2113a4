"""Files of a checkpoint: durable writes, digests, and checking a directory against its manifest.

No DeepSpeed and no process group here: pure file work, so it can be tested alone and used by
tools that only read checkpoints. A digest is the size and the SHA-256 of a file: the size catches
truncation without reading, the hash catches a flipped byte (torch.load does not check zip CRCs).

Every file read here is named by data (a manifest, the names it lists, a trainer state), so it is
read through data_pipeline/confined.py with the checkpoint folder as its root: inside it after
realpath, a regular file, JSON with a size cap, and no content in any message. A manifest is
checked for what a usable checkpoint needs (`manifest_problem`) before anything trusts it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

from data_pipeline.confined import UnsafeFileError, inside, open_regular, read_capped
from pretrain.checkpoint import ds_names

MANIFEST = "manifest.json"
_CHUNK = 8 << 20
JSON_MAX_BYTES = 64 << 20  # a manifest or trainer state: a few KB to a few MB at thousands of ranks
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


def digest(path: Path, sync: bool = False, root: Path | None = None) -> dict:
    """{"size", "sha256"} of a file; with sync, also forces the file's data to disk. With `root`, `path`
    is named by data: it is read only inside `root`, and only when it is a regular file."""
    h = hashlib.sha256()
    with (open_regular(root, path) if root is not None else open(path, "rb")) as f:
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
    """A JSON object from `path` (inside its folder, a regular file, at most JSON_MAX_BYTES), or a
    one-line CheckpointError naming it."""
    try:
        data = json.loads(read_capped(path.parent, path.name, JSON_MAX_BYTES))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing") from None
    except UnsafeFileError as e:
        raise CheckpointError(f"{what}: {e}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {what} does not parse ({_reason(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def _reason(e: BaseException) -> str:
    """An error's kind and position, never the bytes it was reading."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno} column {e.colno}"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 at byte {e.start}"
    return getattr(e, "strerror", None) or type(e).__name__


def read_manifest(directory: Path) -> dict:
    """The manifest of a checkpoint folder, refused in one line unless it describes a usable checkpoint."""
    manifest = read_json(directory / MANIFEST, "the checkpoint manifest")
    if problem := manifest_problem(manifest, directory.name):
        raise CheckpointError(f"{directory / MANIFEST}: {problem}")
    return manifest


def _count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def manifest_problem(manifest: dict, folder: str) -> str | None:
    """Why a parsed manifest cannot describe a checkpoint this framework wrote, or None: a step that is
    not its folder's, no config (a resume compares it), no files, a name outside the folder, no model
    states, or a rank without its trainer state."""
    step, world, files = manifest.get("step"), manifest.get("world_size"), manifest.get("files")
    if not isinstance(files, dict) or not _count(step, 0):
        return "the checkpoint manifest lacks 'files' or 'step'"
    if (m := re.fullmatch(r"step(\d+)", folder)) and int(m.group(1)) != step:
        return f"the checkpoint manifest says step {step}, the folder is {folder}"
    if not _count(world, 1):
        return "the checkpoint manifest has no world_size >= 1"
    if not isinstance(manifest.get("config"), dict) or not manifest["config"]:
        return "the checkpoint manifest lacks the run's config"
    if not files:
        return "the checkpoint manifest lists no files"
    for name, want in files.items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name == MANIFEST:
            return f"the checkpoint manifest lists {name[:80]!r}, not a file name inside the folder"
        if not isinstance(want, dict) or not _count(want.get("size"), 0) or \
                not _SHA256.match(str(want.get("sha256", ""))):
            return f"the checkpoint manifest's entry for {name} has no size and SHA-256"
    if not any((parsed := ds_names.parse(Path(n).name)) and parsed.kind == "model" for n in files):
        return "the checkpoint manifest lists no model states"
    missing = [r for r in range(world) if f"trainer_state_rank{r}.json" not in files]
    if missing:
        return f"the checkpoint manifest lists no trainer state for rank {missing[0]} of {world}"
    return None


def check_sizes(directory: Path, manifest: dict) -> str | None:
    """The first missing, wrongly sized or unlisted file, or one that is not a regular file inside the
    folder, as a one-line problem, or None. Cheap: stat only."""
    for name, want in sorted(manifest["files"].items()):
        path = directory / name
        try:
            st = os.stat(inside(directory, name))
        except FileNotFoundError:
            return f"{path}: missing (the manifest lists it)"
        except UnsafeFileError as e:
            return str(e)
        if not stat.S_ISREG(st.st_mode):
            return f"{path}: not a regular file"
        if st.st_size != want["size"]:
            return f"{path}: {st.st_size} bytes, the manifest says {want['size']} (truncated or overwritten)"
    listed = set(manifest["files"]) | {MANIFEST}
    for name in entries(directory):
        if name not in listed:
            return f"{directory / name}: not in the manifest (a checkpoint holds only the files it lists)"
    return None


def entries(directory: Path) -> list[str]:
    """Every entry below `directory` that is not a folder (files, links, FIFOs...), as relative paths;
    links to folders are not followed (a planted link to / must not make this walk the disk)."""
    out = []
    for top, dirs, files in os.walk(directory, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            out.append(os.path.relpath(os.path.join(top, name), directory))
    return sorted(out)


def check_hashes(directory: Path, names: list[str], manifest: dict) -> str | None:
    """The first of `names` whose content differs from the manifest, as a one-line problem, or None."""
    for name in names:
        path = directory / name
        try:
            got = digest(Path(name), root=directory)
        except UnsafeFileError as e:
            return str(e)
        except OSError as e:
            return f"{path}: cannot be read ({e.strerror or e})"
        if got != manifest["files"][name]:
            return f"{path}: content differs from the manifest's checksum (damaged file)"
    return None
