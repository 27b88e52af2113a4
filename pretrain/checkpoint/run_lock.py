"""One job per run_dir: rank 0 holds `run_dir/run.lock` (host, pid, start time, SLURM job id) while it
runs, and touches it every `stale_s / 4` seconds from a background thread (the heartbeat).

A second job on the same run_dir is refused with one line. A lock left by a job that died is taken
over: on the same host when its pid no longer runs (or is another process now: the process start
time is recorded too); from another host, which cannot see the pid - a SLURM requeue usually lands
on another node - when its heartbeat is older than `stale_s` (`trainer.lock_stale_s`). A job on a
node that lost its network but still runs would stop heartbeating too; `stale_s` must therefore be
longer than any pause of the shared file system, and such a job cannot save into run_dir unnoticed:
it finds the lock no longer its own and says so.

Taking over renames the stale file away and creates a new one with O_EXCL, so of two jobs that race
for a stale lock exactly one wins.

The lock is read through data_pipeline/confined.py (run_dir its root, a regular file, at most
LOCK_MAX_BYTES): a run.lock that is a symlink out of run_dir, a FIFO or a device is an unreadable
lock, never opened for reading; its content is never printed.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.confined import UnsafeFileError, read_capped

LOCK = "run.lock"
LOCK_MAX_BYTES = 4096  # host, pid, start time, job id: a few hundred bytes


def read_lock(path: Path) -> bytes | None:
    """The bytes of a lock file, or None when it is not a small regular file inside its folder (it is
    then an unreadable lock). Raises FileNotFoundError when there is none."""
    try:
        return read_capped(path.parent, path.name, LOCK_MAX_BYTES)
    except UnsafeFileError:
        return None


class RunLockError(RuntimeError):
    """run_dir is in use by another job."""


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, /proc/PID/stat field 22), to tell a
    reused pid from the original; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs on this host; a zombie (killed, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _holder_text(info: dict) -> str:
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, started {info.get('started')}"


def parse_holder(data: bytes) -> dict | None:
    """The holder a lock file names, or None when it is not a lock this module wrote: not UTF-8, not
    JSON, not an object, or without a host and a positive integer pid. (A missing pid must not become
    -1: `os.kill(-1, 0)` succeeds as root, and the lock would look alive forever.)"""
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("host"), str):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    return info


def stale_reason(info: dict | None, age_s: float, stale_s: float, host: str) -> str | None:
    """Why the lock described by `info` (None: unreadable) is stale, or None if its job may live."""
    if info is None:
        return f"unreadable lock file, untouched for {age_s:.0f} s" if age_s > min(stale_s, 10.0) else None
    if info.get("host") == host:
        pid = info["pid"]
        if not _pid_alive(pid):
            return f"pid {pid} is not running on {host}"
        start = _process_start(pid)
        if info.get("pid_start") and start and start != info["pid_start"]:
            return f"pid {pid} on {host} is another process now"
        return None
    if age_s > stale_s:
        return f"no heartbeat for {age_s:.0f} s (> trainer.lock_stale_s={stale_s:g}) from another host"
    return None


@dataclass
class RunLock:
    path: Path
    info: dict
    stale_s: float
    _stop: threading.Event = field(default_factory=threading.Event)

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True).start()
        atexit.register(self.release)

    def _beat(self) -> None:
        period = max(self.stale_s / 4, 0.5)
        while not self._stop.wait(period):
            if not self.is_mine():
                print(f"warning: {self.path} was taken over by another job ({_holder_text(self._read() or {})}); "
                      f"this job no longer owns run_dir", file=sys.stderr, flush=True)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a file system pause: try again at the next beat

    def _read(self) -> dict | None:
        try:
            data = read_lock(self.path)
        except OSError:
            return None
        return parse_holder(data) if data is not None else None

    def is_mine(self) -> bool:
        return self._read() == self.info

    def release(self) -> None:
        self._stop.set()
        if self.is_mine():
            self.path.unlink(missing_ok=True)


def acquire(run_dir: str, stale_s: float) -> RunLock:
    """Takes the run_dir's lock or raises a one-line RunLockError naming the job that holds it."""
    path = Path(run_dir) / LOCK
    host = socket.gethostname()
    info = {"host": host, "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            lock = RunLock(path, info, stale_s)
            lock.start_heartbeat()
            return lock
        try:
            before = os.lstat(path)  # the link itself, if it is one: its target is not this job's to stat
            text, age = read_lock(path), time.time() - before.st_mtime
        except FileNotFoundError:
            continue  # released meanwhile
        holder = parse_holder(text) if text is not None else None
        reason = stale_reason(holder, age, stale_s, host)
        if reason is None and holder is None:
            raise RunLockError(f"{path}: not a lock this framework wrote (unreadable), touched {age:.0f} s ago; it is "
                               f"taken over once untouched for {min(stale_s, 10.0):g} s, or remove it if no job uses "
                               f"run_dir")
        if reason is None:
            raise RunLockError(f"{path}: run_dir is in use by {_holder_text(holder)} (heartbeat {age:.0f} s ago); "
                               f"stop that job or choose another run_dir")
        aside = path.with_name(f"{LOCK}.stale-{host}-{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue  # another job took it over first; look again
        moved = os.lstat(aside)
        if (moved.st_ino, moved.st_dev) != (before.st_ino, before.st_dev):  # a racing job's new lock: give it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            finally:
                aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        print(f"note: taking over {path} from {_holder_text(holder or {})}: {reason}", flush=True)
    raise RunLockError(f"{path}: could not take the run_dir lock (other jobs keep taking it)")
