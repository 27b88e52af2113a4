"""Which checkpoint a command uses: one verdict (`verify`) for the resume and every tool.

The trainer's `find_resume` shares the hashing between ranks and, once a usable checkpoint is chosen,
has rank 0 (which holds run.lock) move every rejected folder aside as stepNNNNNNNN.rejected, in one
line each; the tools' `choose` (export, evaluate, generate, lm_eval) skips a rejected folder with one
line and changes nothing (a trainer may be saving, the mount may be read-only). Every file is read
through data_pipeline/confined.py (pretrain/checkpoint/files.py); the `latest` pointer is read for
messages only, capped and never followed out of the checkpoints folder.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from data_pipeline.confined import UnsafeFileError, inside, read_capped
from pretrain.checkpoint import safe_load
from pretrain.checkpoint.files import CheckpointError, check_hashes, check_sizes, owner_rank, read_manifest
from pretrain.checkpoint.store import PARTIAL, Resume, _one_line, _rank0_print, _step_of, ckpt_dir, tag


def verify(directory: Path, to_hash=None) -> tuple[str | None, dict | None]:
    """The one verdict on a checkpoint folder, for the resume and for every tool: its manifest (see
    files.manifest_problem), the size of every file it lists (no other file, none outside the
    folder), the hashes of the files `to_hash(names)` picks (default: all), and no engine file among
    those that would need anything beyond what DeepSpeed writes (read without executing it).
    Returns (one-line problem or None, manifest)."""
    try:
        manifest = read_manifest(directory)
    except CheckpointError as e:
        return str(e), None
    problem = check_sizes(directory, manifest)
    if problem is None:
        mine = sorted(manifest["files"]) if to_hash is None else to_hash(sorted(manifest["files"]))
        problem = check_hashes(directory, mine, manifest)
        # The manifest sits beside the files, so matching it is integrity, not trust.
        for name in (n for n in mine if n.endswith(".pt") and problem is None):
            problem = safe_load.refusal(directory / name)
    return problem, manifest


def _problem(directory: Path) -> tuple[str | None, dict | None]:
    """This rank's verdict on one checkpoint: the ranks share the hashing."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return verify(directory, lambda names: [n for n in names if owner_rank(Path(n).name) % world == rank])


POINTER_MAX_BYTES = 64  # `latest` holds one tag


def read_pointer(path: Path) -> str | None:
    """What `latest` names, for messages only (resuming does not trust it): its text (bytes that are
    not UTF-8 as \\xNN), or its repr when that is not one printable line; None when there is none.
    Read through data_pipeline/confined.py: a `latest` outside the checkpoints folder, a FIFO, a
    device or a large file is described, never read."""
    try:
        data = read_capped(path.parent, path.name, POINTER_MAX_BYTES)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except UnsafeFileError as e:
        return f"<not read: {str(e).split(': ', 1)[-1]}>"
    except OSError as e:
        return f"<unreadable: {e.strerror or e}>"
    text = data.decode("utf-8", "backslashreplace").strip()
    return text if text.isprintable() else repr(text)


def candidates(root: Path) -> list[str]:
    """Checkpoint folders by name (stepNNNNNNNN, inside `root` after realpath), newest first; not verified."""
    if not root.is_dir():
        return []
    names = []
    for p in root.iterdir():
        if _step_of(p.name) is None or not p.is_dir():
            continue
        try:
            inside(root, p.name)
        except UnsafeFileError:
            continue  # a symlink out of the checkpoints folder is not one of this run's checkpoints
        names.append(p.name)
    return sorted(names, key=_step_of, reverse=True)


REJECTED = ".rejected"


def retire(root: Path, name: str) -> str:
    """Moves a checkpoint that failed verification aside (never deleted: it may be worth a look), so no
    later resume or tool meets it again. The trainer only, holding run.lock. Returns the new name."""
    aside = name + REJECTED
    if (root / aside).exists():
        aside = f"{name}{REJECTED}-{os.getpid()}-{int(time.time())}"
    os.rename(root / name, root / aside)
    return aside


def find_resume(run_dir: str) -> Resume | None:
    """The newest checkpoint whose every file matches its manifest, agreed by all ranks, or None
    when run_dir has none. Skipped checkpoints are reported in one line each (rank 0) and, once a
    usable one is chosen, moved aside by rank 0 (which holds run.lock). Raises a one-line
    CheckpointError, before any training and changing nothing, when checkpoints exist but none is usable."""
    root = ckpt_dir(run_dir)
    if not root.is_dir():
        return None
    notes = [f"note: ignoring {p}: a save that did not finish" for p in sorted(root.iterdir())
             if p.name.endswith(PARTIAL) and p.is_dir()]
    listed = [candidates(root)]
    dist.broadcast_object_list(listed, src=0)  # rank 0's listing: every rank walks the same folders
    pointer_file = root / "latest"
    pointer = read_pointer(pointer_file)
    first_problem, chosen, skipped = None, None, []
    for name in listed[0]:
        local = _problem(root / name)
        verdicts: list = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, local[0])
        problem = next((v for v in verdicts if v), None)
        if problem is None:
            chosen = Resume(name, root / name, local[1])
            break
        skipped.append((name, problem))
        first_problem = first_problem or problem
    if chosen is None:
        _rank0_print(*notes, *(f"warning: skipping checkpoint {n}: {p}" for n, p in skipped))
        if first_problem:
            raise CheckpointError(f"no usable checkpoint in {root} ({len(listed[0])} found; newest: {first_problem}); "
                                  f"nothing was changed")
        if pointer:
            raise CheckpointError(f"{pointer_file} names {pointer}, which is not in {root}, and no complete "
                                  f"checkpoint is there; remove {pointer_file} to start afresh")
        return None
    for name, problem in skipped:
        if dist.get_rank() == 0:
            try:
                notes.append(f"warning: skipping checkpoint {name}: {problem}; moved aside to {retire(root, name)}")
            except OSError as e:
                notes.append(f"warning: skipping checkpoint {name}: {problem} (not moved aside: {_one_line(e)})")
    if pointer is not None and pointer != chosen.tag:
        notes.append(f"warning: {pointer_file} names {pointer}; the newest usable checkpoint is {chosen.tag}")
    if listed[0][0] != chosen.tag:
        notes.append(f"warning: resuming from {chosen.tag}, not the newest checkpoint {listed[0][0]}")
    _rank0_print(*notes)
    return chosen


def choose(run_dir: str | Path, step: int | None = None, warn=None) -> Resume:
    """The checkpoint a tool (export, evaluate, generate, lm_eval) reads: the newest that `verify`
    passes, or the one at `step`. Needs no process group and changes nothing: a skipped checkpoint
    is one line to `warn` (default: stderr), since a trainer may be saving and the mount may be
    read-only. Raises a one-line CheckpointError when there is none."""
    root = ckpt_dir(str(run_dir))
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    names = candidates(root)
    if step is not None:
        if tag(step) not in names:
            raise CheckpointError(f"{run_dir}: no checkpoint at --step {step} (checkpoints at steps: "
                                  f"{sorted(_step_of(n) for n in names) or 'none'})")
        names = [tag(step)]
    first = None
    for name in names:
        problem, manifest = verify(root / name)
        if problem is None:
            return Resume(name, root / name, manifest)
        if step is not None:
            raise CheckpointError(f"checkpoint {name} is not usable: {problem}")
        warn(f"warning: skipping checkpoint {name}: {problem}")
        first = first or problem
    if first:
        raise CheckpointError(f"no usable checkpoint in {root} ({len(names)} found; newest: {first})")
    raise CheckpointError(f"{run_dir}: no complete checkpoint in {root}")
