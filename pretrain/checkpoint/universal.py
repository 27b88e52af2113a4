"""Resuming at another world size: DeepSpeed's ZeRO files are cut per rank, so a checkpoint written by
N ranks is first converted to DeepSpeed's universal form (one folder per parameter, with its fp32
weights and optimizer moments whole) and loaded with `checkpoint: {load_universal: true}`.

Rank 0 runs the conversion (DeepSpeed's `ds_to_universal`, in a subprocess: the tool starts its own
worker pools; through pretrain/checkpoint/safe_load.py, so that it unpickles nothing but what DeepSpeed
writes and ends with its workers when the rank dies) into checkpoints/universal/<tag>.partial and
renames it when done;
the other ranks poll the file system for the outcome rather than wait in a collective, since a large
model's conversion can outlast the process group's timeout. A finished conversion is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch.distributed as dist

from pretrain.checkpoint import safe_load
from pretrain.checkpoint.files import CheckpointError, read_json, write_atomic
from pretrain.checkpoint.store import PARTIAL, Resume, ckpt_dir, config_hash

DONE = "converted.json"


def load_dir_for(resume: Resume, run_dir: str, deepspeed_section: dict,
                 reshard: str | None = None) -> tuple[Path, dict]:
    """Where the engine loads `resume` from at this run's world size, and the DeepSpeed config
    section to build the engine with (with load_universal set when a conversion was needed).
    `reshard`: why the shards must be recut at the same world size (another cluster.expert_parallel)."""
    world = dist.get_world_size()
    if resume.world_size == world and reshard is None:
        return ckpt_dir(run_dir), deepspeed_section
    root = ckpt_dir(run_dir) / "universal"
    if dist.get_rank() == 0:
        (root / f"{resume.tag}.error").unlink(missing_ok=True)  # from an earlier attempt
    dist.barrier()
    if dist.get_rank() == 0:
        why = reshard or f"was written by {resume.world_size} ranks, this run has {world}"
        print(f"checkpoint {resume.tag} {why}: loading DeepSpeed's universal form from {root / resume.tag}", flush=True)
        convert_once(resume.directory, root, resume.tag, _source_id(resume))
    else:
        _wait_for(resume, root)
    section = {**deepspeed_section, "checkpoint": {**deepspeed_section.get("checkpoint", {}), "load_universal": True}}
    return root, section


def _source_id(resume: Resume) -> str:
    return config_hash(resume.manifest["files"])  # changes when the source checkpoint is replaced


def is_converted(root: Path, tag: str, source_id: str) -> bool:
    marker = root / tag / DONE
    return marker.is_file() and read_json(marker, "the conversion record").get("source") == source_id


def convert_once(directory: Path, root: Path, tag: str, source_id: str) -> Path:
    """root/tag: DeepSpeed's universal form of the checkpoint in `directory` (converted unless a finished
    conversion of the same source is there). Also read by the export of an expert-parallel run."""
    error_file, final = root / f"{tag}.error", root / tag
    if is_converted(root, tag, source_id):
        return final
    root.mkdir(parents=True, exist_ok=True)
    out = root / (tag + PARTIAL)
    shutil.rmtree(out, ignore_errors=True)
    workers = str(max(1, min(4, (os.cpu_count() or 2) // 2)))
    # DeepSpeed's ds_to_universal, through safe_load: weights-only loads with DeepSpeed's classes allowed,
    # and, in a session of its own, ended with its workers if this rank dies (even by kill -9).
    cmd = safe_load.universal_command(["--input_folder", str(directory), "--output_folder", str(out),
                                       "--num_extract_workers", workers, "--num_merge_workers", workers])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["LLADA_CONVERT_PARENT"] = str(os.getpid())
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, start_new_session=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        message = f"{directory}: conversion to DeepSpeed's universal checkpoint failed ({tail})"
        write_atomic(error_file, message)
        shutil.rmtree(out, ignore_errors=True)
        raise CheckpointError(message)
    write_atomic(out / DONE, json.dumps({"source": source_id}))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(out, final)
    return final


def _wait_for(resume: Resume, root: Path, poll_s: float = 0.5) -> None:
    error_file = root / f"{resume.tag}.error"
    while not is_converted(root, resume.tag, _source_id(resume)):
        if error_file.is_file():
            raise CheckpointError(error_file.read_text().strip())
        time.sleep(poll_s)
