"""Checkpoints: DeepSpeed's engine state (sharded model, optimizer, lr schedule) plus, per rank, a
small JSON with what the engine does not know (step, tokens, the data stream's state, RNG states),
and a manifest that makes the whole thing one verifiable unit.

Layout of `run_dir/checkpoints/`:
    stepNNNNNNNN/            a complete checkpoint: DeepSpeed's files, trainer_state_rank{R}.json,
                             manifest.json (size and SHA-256 of every file, step, world size,
                             resolved config and its hash, data fingerprint, code version)
    stepNNNNNNNN.partial/    a save in progress, or one that never finished: never loaded
    universal/stepNNNNNNNN/  DeepSpeed's universal form of a checkpoint, made on a resume at
                             another world size (pretrain/checkpoint/universal.py)
    latest                   the newest complete tag, for people and tools (zero_to_fp32.py);
                             resuming does not trust it

A save is complete only when every rank has written and digested its files and rank 0 has written
the manifest and renamed `.partial` away, so a crash, kill -9 or full disk at any moment of a save
leaves the previous checkpoint as it was and the half-written one is never picked. DeepSpeed's own
`latest` file is not written: its rank 0 writes it before the other ranks finish.

On resume every file of the newest complete checkpoint is checked against the manifest (ranks
share the hashing); a damaged one is reported and the next older one is tried. Which checkpoint
a command uses (the resume and every tool, through one verdict): pretrain/checkpoint/choice.py.
"""

from __future__ import annotations

import base64
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.checkpoint import ds_names, safe_load
from pretrain.checkpoint.files import (
    MANIFEST,
    CheckpointError,
    CheckpointWriteError,
    digest,
    files_of_rank,
    fsync_dir,
    read_json,
    write_atomic,
)

__all__ = ["CheckpointError", "CheckpointWriteError", "Resume", "SaveClock", "ckpt_dir", "latest", "load", "retain",
           "save", "tag"]

_TAG = re.compile(r"^step(\d{8,})$")
PARTIAL = ".partial"


def ckpt_dir(run_dir: str) -> Path:
    return Path(run_dir) / "checkpoints"


def tag(step: int) -> str:
    return f"step{step:08d}"


def _step_of(name: str) -> int | None:
    m = _TAG.match(name)
    return int(m.group(1)) if m else None


def complete_tags(run_dir: str) -> list[str]:
    """Tags whose save finished (a manifest is there), newest first. Not verified: see find_resume."""
    root = ckpt_dir(run_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _step_of(p.name) is not None and (p / MANIFEST).is_file()]
    return sorted(tags, key=_step_of, reverse=True)


def latest(run_dir: str) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    tags = complete_tags(run_dir)
    return tags[0] if tags else None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`git describe` of the source tree when it is a git checkout, else the installed package's version."""
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=repo, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "llada-pretrain " + version("llada-pretrain")
    except PackageNotFoundError:
        return "unknown"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _write_failure(path: Path, e: BaseException) -> str:
    """One line for a failed checkpoint write. A full disk says so and where: torch's writer reports it
    as `inline_container.cc:672 unexpected pos`, without errno, so the free space decides."""
    full = isinstance(e, OSError) and e.errno == errno.ENOSPC
    if not full:
        try:
            full = shutil.disk_usage(_existing(path)).free < FULL_BELOW_BYTES
        except OSError:
            pass
    return f"no space left on {_existing(path)}" if full else f"{path}: {_one_line(e)}"


FULL_BELOW_BYTES = 1 << 20  # after a failed write, less free space than this means the write filled the disk


def _existing(path: Path) -> Path:
    """The nearest folder of `path` that exists (the file itself may be gone)."""
    path = Path(path)
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _rank0_print(*lines: str) -> None:
    if dist.get_rank() == 0:
        for line in lines:
            print(line, flush=True)


# -- saving -------------------------------------------------------------------------------------
def save(engine, run_dir: str, step: int, trainer_state: dict, meta: dict, keep_last: int = 0,
         keep_every: int = 0) -> Path:
    """Writes checkpoint `step` with every rank; returns its directory once it is complete. On a
    failure (a full disk, an unwritable file) every rank raises the same CheckpointError and the
    earlier checkpoints stay as they were. `meta`: config, data_fingerprint (recorded in the manifest)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    root = ckpt_dir(run_dir)
    final, partial = root / tag(step), root / (tag(step) + PARTIAL)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
    dist.barrier()

    failed = _save_engine(engine, root, partial.name)
    error, files = (f"rank {rank}: {failed}" if failed else None), {}
    if error is None:
        try:
            state_file = partial / f"trainer_state_rank{rank}.json"
            with open(state_file, "w") as f:
                json.dump(trainer_state, f)
            files = {name: digest(partial / name, sync=True) for name in files_of_rank(partial, rank)}
        except OSError as e:
            error = f"rank {rank}: {_write_failure(partial, e)}"
    reports: list = [None] * world
    dist.all_gather_object(reports, (error, files))
    errors = [e for e, _ in reports if e]
    if not errors and rank == 0:
        try:
            _finish(root, final, partial, step, world, reports, meta)
        except OSError as e:
            errors = [f"rank 0: {_write_failure(partial, e)}"]
    outcome = [errors]
    dist.broadcast_object_list(outcome, src=0)
    errors = outcome[0]
    if errors:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # frees the space a full disk needs
        previous = latest(run_dir)
        free = shutil.disk_usage(root).free / 2**20
        raise CheckpointWriteError(
            f"checkpoint {final} could not be written ({errors[0]}; {free:,.0f} MiB free there); "
            f"{'checkpoint ' + previous + ' is intact' if previous else 'no earlier checkpoint'}")
    if rank == 0:
        try:
            retain(run_dir, keep_last, keep_every)
        except OSError as e:
            print(f"warning: deleting old checkpoints failed: {_one_line(e)}", file=sys.stderr, flush=True)
    dist.barrier()
    return final


def _save_engine(engine, root: Path, name: str) -> str | None:
    """DeepSpeed's save_checkpoint, with its file writes made to record a failure instead of raising:
    ZeRO-3 runs collectives after the writes (an all-gather in its checkpoint epilogue, a final
    barrier), so a rank whose write raised would leave the others waiting there forever. Every rank
    goes through the whole save; the first failed write of this rank is returned."""
    failures: list[str] = []
    writer, copy_scripts = engine.checkpoint_engine, engine._copy_recovery_script

    def save_file(state_dict, path):
        try:
            type(writer).save(writer, state_dict, path)
        except Exception as e:  # torch.save reports a full disk as RuntimeError, open() as OSError
            failures.append(_write_failure(Path(path), e))

    def copy_recovery_scripts(save_path):
        try:
            copy_scripts(save_path)
        except OSError as e:
            failures.append(_write_failure(Path(save_path), e))

    writer.save, engine._copy_recovery_script = save_file, copy_recovery_scripts
    try:
        engine.save_checkpoint(str(root), tag=name, save_latest=False)
    finally:
        del writer.save, engine._copy_recovery_script  # back to the class's methods
    return failures[0] if failures else None


def _finish(root: Path, final: Path, partial: Path, step: int, world: int, reports: list, meta: dict) -> None:
    """Rank 0, once every rank has written and digested its files: the manifest, then the rename
    that makes the checkpoint exist, then `latest`."""
    files: dict[str, dict] = {}
    for _, rank_files in reports:
        files.update(rank_files)
    missing = [r for r in range(world) if f"trainer_state_rank{r}.json" not in files]
    if missing:
        raise OSError(f"ranks {missing} reported no trainer state in {partial}")
    manifest = {"format": 1, "step": step, "world_size": world, "tokens": meta.get("tokens"),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "code_version": code_version(), "deepspeed_version": _deepspeed_version(),
                "torch_version": torch.__version__, "data_fingerprint": meta.get("data_fingerprint"),
                "config_hash": config_hash(meta.get("config", {})), "config": meta.get("config", {}),
                "files": dict(sorted(files.items()))}
    write_atomic(partial / MANIFEST, json.dumps(manifest, indent=1, default=str))
    replaced = None
    if final.exists():  # a damaged checkpoint of this step, skipped by the resume: replace it
        replaced = root / f".replaced-{final.name}-{os.getpid()}"
        os.rename(final, replaced)
    os.rename(partial, final)
    fsync_dir(root)
    write_atomic(root / "latest", final.name)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def retain(run_dir: str, keep_last: int, keep_every: int) -> list[str]:
    """Deletes complete checkpoints that are neither among the `keep_last` newest (0: keep all) nor
    at a multiple of `keep_every` steps (0: none kept for that reason), and leftovers of interrupted
    saves. The newest complete checkpoint is never deleted. Returns the deleted tags. Rank 0 only,
    between saves."""
    root = ckpt_dir(run_dir)
    tags = complete_tags(run_dir)
    keep = set(tags[:max(keep_last, 1)]) if keep_last else set(tags)
    keep |= {t for t in tags if keep_every and _step_of(t) % keep_every == 0}
    deleted = [t for t in tags if t not in keep]
    for name in deleted:
        # Renamed first, so a kill in the middle of the delete leaves nothing that looks like a checkpoint.
        doomed = root / f".deleting-{name}"
        os.rename(root / name, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        shutil.rmtree(root / "universal" / name, ignore_errors=True)
    for leftover in root.iterdir():
        if leftover.name.endswith(PARTIAL) or leftover.name.startswith((".deleting-", ".replaced-")):
            shutil.rmtree(leftover, ignore_errors=True)
    return deleted


class SaveClock:
    """Time-based saves, so a crash never loses more than `minutes` of work. Rank 0's clock decides;
    the loop shares its answer with the other step-boundary flags, so every rank saves at the same step."""

    def __init__(self, minutes: float):
        self.interval = minutes * 60.0
        self.last = time.monotonic()

    def due(self) -> bool:
        """This process's clock only (no collective)."""
        return bool(self.interval) and time.monotonic() - self.last >= self.interval

    def reset(self) -> None:
        self.last = time.monotonic()


# -- resuming ------------------------------------------------------------------------------------
@dataclass
class Resume:
    tag: str
    directory: Path
    manifest: dict

    @property
    def world_size(self) -> int:
        return int(self.manifest.get("world_size", 0))


def load(engine, resume: Resume, load_dir: Path, same_data_layout: bool = True) -> dict:
    """Restores `resume` into `engine` from `load_dir` (checkpoints/, or its universal/ form at another
    world size) and returns this rank's trainer state. At another world size (or another data-parallel
    layout: `same_data_layout` False, e.g. another cluster.sequence_parallel) every rank gets rank 0's
    state without the per-rank RNG states: the stream re-plans from it (every rank of the old run
    had consumed the same number of micro-batches), and the loop re-seeds the masking RNG."""
    try:
        with safe_load.weights_only_loads():  # DeepSpeed's torch.load(weights_only=False) included
            path, _ = engine.load_checkpoint(str(load_dir), tag=resume.tag)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{load_dir / resume.tag}: DeepSpeed could not load it ({_one_line(e)})") from None
    except Exception as e:
        if not safe_load.is_weights_only_refusal(e):
            raise
        named = safe_load.first_refusal(load_dir / resume.tag)
        raise CheckpointError(named or f"{load_dir / resume.tag}: a file needs a class DeepSpeed's checkpoint "
                                       f"files never hold; refused without unpickling ({_one_line(e)})") from None
    if path is None:
        raise CheckpointError(f"{load_dir / resume.tag}: DeepSpeed could not load it")
    if load_dir != resume.directory.parent:  # the universal form: DeepSpeed restores no buffer from it
        restore_buffers(engine.module, resume.directory)
    rank, world = dist.get_rank(), dist.get_world_size()
    same_layout = resume.world_size == world and same_data_layout
    state = read_json(resume.directory / f"trainer_state_rank{rank if same_layout else 0}.json", "the trainer state")
    if not same_layout:
        for key in ("mask_rng", "torch_rng", "cuda_rng"):
            state.pop(key, None)
    return state


def restore_buffers(module: torch.nn.Module, directory: Path) -> None:
    """The module's saved buffers (model.moe's expert biases: state that moves every step) from the
    checkpoint's model states, which every rank wrote alike; DeepSpeed's universal load leaves them at
    their initial values."""
    from pretrain.checkpoint.zero_files import load_engine_file

    saved = load_engine_file(ds_names.model_files(directory)[0]).get("module") or {}
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved and saved[name].shape == buf.shape:
                buf.copy_(saved[name].to(buf.dtype))


# -- RNG states as JSON ------------------------------------------------------------------------------
def rng_state(generator: torch.Generator) -> list[int]:
    return generator.get_state().tolist()


def set_rng_state(generator: torch.Generator, state: list[int]) -> None:
    generator.set_state(torch.tensor(state, dtype=torch.uint8))


def encode_bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
