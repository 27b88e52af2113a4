"""Run metrics: one JSON object per logged step in run_dir/metrics.jsonl, mirrored to W&B, and the
one console line per log step.

Only rank 0 writes; the values it writes are already reduced over ranks by the loop. The W&B run id
is kept in run_dir/wandb/run_id, so a run resumed in the same run_dir continues the same W&B run
(offline: each process writes its own offline-run-*-<id> folder; `wandb sync` joins them).
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import string
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

WANDB_ID_FILE = "wandb/run_id"


def wandb_credentials_found() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str, device: str) -> str:
    """logging.mode=auto: WANDB_MODE when set; offline on the CPU; online on accelerators when
    credentials are found, else offline (a cluster job without them still keeps its metrics)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if device != "cpu" and wandb_credentials_found() else "offline"


def wandb_run_id(run_dir: str) -> str:
    """The id this run_dir's W&B run has, made and kept on first use."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's own form
    path.write_text(run_id + "\n")
    return run_id


class MetricsLogger:
    """metrics.jsonl is the record; W&B mirrors it. A W&B failure (its service process killed by a
    job-wide SIGTERM, a lost connection) is one warning, and the run goes on without W&B: it never
    takes a run down. A record that cannot be written (a full disk) is a warning too, and never a
    torn line: the next checkpoint save is what stops a run on a full disk."""

    def __init__(self, run_dir: str, logging_cfg, config: dict, enabled: bool, start_step: int = 0,
                 device: str = "cpu"):
        """start_step: the step training (re)starts from; records past it, logged by an interrupted
        run after its last checkpoint, are dropped so each step appears once."""
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        self.unwritten = 0  # records lost to write errors since the last one written
        if not enabled:
            return
        trim_jsonl(self.path, start_step)
        mode = resolve_wandb_mode(logging_cfg.mode, device)
        if mode == "disabled":
            return
        import wandb  # only rank 0 pays for the import

        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            self.wandb_run = wandb.init(mode=mode, project=logging_cfg.project, entity=logging_cfg.entity,
                                        group=logging_cfg.group, tags=list(logging_cfg.tags),
                                        name=logging_cfg.name or Path(run_dir).name, dir=run_dir, config=config,
                                        id=wandb_run_id(run_dir), resume="allow")
        except Exception as e:  # W&B's own errors derive from Exception; no W&B is not a reason to stop
            self._wandb_failed("could not start", e)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            append_line(self.path, json.dumps({**record, "time": round(time.time(), 3)}))  # W&B keeps its own time
        except OSError as e:
            if not self.unwritten:
                print(f"warning: {self.path}: step {record.get('step')} not recorded ({e.strerror or e}); training "
                      f"goes on, the records that cannot be written are counted", file=sys.stderr, flush=True)
            self.unwritten += 1
        else:
            if self.unwritten:
                print(f"warning: {self.path}: writing again; {self.unwritten} record(s) before step "
                      f"{record.get('step')} were lost", file=sys.stderr, flush=True)
                self.unwritten = 0
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            except Exception as e:
                self._wandb_failed(f"failed at step {record.get('step')}", e)

    def _wandb_failed(self, what: str, error: BaseException) -> None:
        """One warning; W&B is off for the rest of this process. Its exit hook is taken down too (it
        would print a traceback at exit talking to the dead service)."""
        text = str(error).strip().splitlines()
        print(f"warning: W&B {what} ({type(error).__name__}: {text[0] if text else ''}); metrics.jsonl keeps the "
              f"record, W&B is off for the rest of this run", file=sys.stderr, flush=True)
        run, self.wandb_run = self.wandb_run, None
        import wandb

        for shut in ((run.finish,) if run is not None else ()) + (wandb.teardown,):
            try:
                shut()
            except Exception:
                pass

    def close(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:
                self._wandb_failed("could not finish", e)


def console_line(r: dict, total_steps: int | None = None, eta: str | None = None) -> str:
    """One line per log step: what to glance at. The full record is in metrics.jsonl and W&B."""
    parts = [f"step {r['step']}/{total_steps}" if total_steps else f"step {r['step']:>6}", f"loss {r['loss']:.4f}"]
    if "masked_acc" in r:
        parts.append(f"acc {r['masked_acc']:.3f}")
    if r.get("block_size") is not None:  # block diffusion: the size this step trained with
        parts.append(f"block {r['block_size']}")
    parts += [f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm'] or 0:.3f}",
              f"{r['tokens_per_s']:,.0f} tok/s", f"{r['tflops_per_device']:.3g} TFLOP/s/dev"]
    if "mfu" in r:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"{r['step_time_s']:.2f} s/step (data {100 * r['data_wait_share']:.0f}%)")
    if "mem/peak_reserved_gb" in r:
        parts.append(f"mem {r['mem/peak_allocated_gb']:.1f}/{r['mem/peak_reserved_gb']:.1f} GiB")
    elif "mem/rss_gb" in r:
        parts.append(f"rss {r['mem/rss_gb']:.1f} GiB")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    if eta is not None:
        parts.append(f"ETA {eta}")
    return " | ".join(parts)


def append_line(path: Path, line: str) -> None:
    """Appends one whole line or nothing: a write that fails part-way (a full disk) is cut back off,
    so a reader never meets a torn line."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        before = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            try:
                os.ftruncate(fd, before)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def trim_jsonl(path: Path, start_step: int) -> None:
    """Drops the records past `start_step` from a one-JSON-object-per-line file: an interrupted run
    wrote them after its last checkpoint, and the resumed run writes those steps again. A line that
    does not parse (torn by an older writer or a crash) is dropped with a warning."""
    if not path.is_file():
        return
    kept, torn = [], []
    for n, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, TypeError, KeyError):
            torn.append(n)
            continue
        if step <= start_step:
            kept.append(line)
    if torn:
        print(f"warning: {path}: dropped {len(torn)} line(s) that are not whole records (line {torn[0]}...)",
              file=sys.stderr, flush=True)
    path.write_text("".join(line + "\n" for line in kept))
