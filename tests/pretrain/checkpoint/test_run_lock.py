"""The run_dir lock on its own: real files, real processes (a live `sleep`, a dead child), no mocks."""

import json
import os
import socket
import subprocess
import time

import pytest

from pretrain.checkpoint.run_lock import LOCK, RunLockError, acquire


def write_lock(run_dir, host: str, pid: int, age_s: float = 0.0) -> None:
    path = run_dir / LOCK
    path.write_text(json.dumps({"host": host, "pid": pid, "pid_start": None, "started": "earlier",
                                "slurm_job_id": "42"}))
    then = time.time() - age_s
    os.utime(path, (then, then))


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_lock_is_taken_and_released(tmp_path):
    lock = acquire(str(tmp_path), stale_s=60)
    held = json.loads((tmp_path / LOCK).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
    with pytest.raises(RunLockError, match=f"in use by pid {os.getpid()}"):
        acquire(str(tmp_path), stale_s=60)
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_live_job_on_this_host_is_refused(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        write_lock(tmp_path, socket.gethostname(), sleeper.pid, age_s=3600)  # old heartbeat: the pid decides
        with pytest.raises(RunLockError) as e:
            acquire(str(tmp_path), stale_s=60)
        assert str(e.value).count("\n") == 0 and f"pid {sleeper.pid} on {socket.gethostname()}, SLURM job 42" \
            in str(e.value)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_dead_job_on_this_host_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    write_lock(tmp_path, socket.gethostname(), pid)
    lock = acquire(str(tmp_path), stale_s=60)
    assert f"pid {pid} is not running" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_other_host_is_stale_only_without_heartbeat(tmp_path, capsys):
    write_lock(tmp_path, "node-elsewhere", 1234, age_s=5)
    with pytest.raises(RunLockError, match="node-elsewhere"):
        acquire(str(tmp_path), stale_s=60)
    write_lock(tmp_path, "node-elsewhere", 1234, age_s=120)
    lock = acquire(str(tmp_path), stale_s=60)
    assert "no heartbeat for 120 s" in capsys.readouterr().out
    lock.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = acquire(str(tmp_path), stale_s=2)  # beats every 0.5 s
    path = tmp_path / LOCK
    old = time.time() - 100
    os.utime(path, (old, old))
    deadline = time.monotonic() + 10
    while path.stat().st_mtime < time.time() - 50:
        assert time.monotonic() < deadline, "the heartbeat never touched the lock"
        time.sleep(0.1)
    lock.release()


@pytest.mark.parametrize("content", [b"\x00garbage \xff\xfe", b"[1, 2]", b'{"host": HOST, "started": "x"}',
                                     b'{"host": HOST, "pid": "12x"}'],
                         ids=["garbage", "json-list", "no-pid", "non-integer-pid"])
def test_a_lock_this_framework_did_not_write_is_one_line_then_taken_over(tmp_path, capsys, content):
    # A missing pid must not read as -1: `os.kill(-1, 0)` succeeds as root, the lock would live forever.
    path = tmp_path / LOCK
    path.write_bytes(content.replace(b"HOST", json.dumps(socket.gethostname()).encode()))
    with pytest.raises(RunLockError) as e:
        acquire(str(tmp_path), stale_s=60)
    assert "\n" not in str(e.value) and "not a lock this framework wrote" in str(e.value)
    old = time.time() - 30
    os.utime(path, (old, old))
    lock = acquire(str(tmp_path), stale_s=60)
    assert "unreadable lock file, untouched for 30 s" in capsys.readouterr().out
    lock.release()
