"""Hands on the keyboard and ranks that disagree (issue 26, classes 4 and 5), 2 CPU ranks under
`python -m launch.run`: Ctrl-C to the whole job saves and exits 75, a second one ends it at once
without a traceback and leaves nothing a resume trips on; a config that each rank resolves its own
way (run_dir=out_${oc.env:RANK}) is refused in one line before anything is written."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import REPO, TRAIN_ARGS, child_env, run_train
from tests.pretrain.test_faults import finish, processes_using, wait_for_step

LAUNCH = [sys.executable, "-m", "launch.run", "--nproc_per_node", "2", "-m"]


def start(run_dir: Path, data_dir: Path, module: str, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [*LAUNCH, module, *TRAIN_ARGS, f"data.dir={data_dir}", f"run_dir={run_dir}", "logging.mode=disabled",
           *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env={**child_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # a group, as a terminal's job


def ctrl_c(proc: subprocess.Popen) -> None:
    """What a terminal does on Ctrl-C: SIGINT to every process of the foreground job."""
    os.killpg(proc.pid, signal.SIGINT)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def test_ctrl_c_once_saves_and_exits_75_twice_ends_at_once(tmp_path, demo_shards):
    run_dir = tmp_path / "run"
    # Every save of rank 1 hangs (tests/pretrain/slow_save.py), so the second Ctrl-C surely lands in one.
    slow = {"SLOW_SAVE_MATCH": ".partial", "SLOW_SAVE_S": "300"}
    proc = start(run_dir, demo_shards, "tests.pretrain.slow_save", "trainer.max_steps=400", env=slow)
    wait_for_step(proc, run_dir, 2)
    ctrl_c(proc)
    wait_for(lambda: any((run_dir / "checkpoints").glob("*.partial/*optim_states.pt")), proc, "a save in progress")
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    ctrl_c(proc)
    started = time.monotonic()
    code, _, err = finish(proc, timeout=60)
    assert time.monotonic() - started < 30  # at once: not after the 300 s save
    psutil.wait_procs(ranks, timeout=30)
    assert not processes_using(run_dir), "a rank outlived its job"
    assert code == 128 + signal.SIGINT, err[-3000:]
    for bad in ("Traceback", "KeyboardInterrupt", "Error executing job"):
        assert bad not in err, err[-3000:]
    assert "received SIGINT; stopping after this step; Ctrl-C again stops at once without saving" in err
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step") and "." not in p.name]

    # Run again (plain speed): the half-written save is ignored, not tripped over; one Ctrl-C after step 1
    # (step 2 made 3 s longer, so it lands before the end) saves at a step both ranks agree on, exit 75.
    (run_dir / "metrics.jsonl").unlink()  # so that step 1 is this run's (it starts afresh: nothing was saved)
    proc = start(run_dir, demo_shards, "pretrain.train", "trainer.max_steps=6", "fault.sleep_at_step=2",
                 "fault.sleep_s=3")
    wait_for_step(proc, run_dir, 1)
    ctrl_c(proc)
    code, out, err = finish(proc)
    assert code == 75, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "a save that did not finish" in out and "taking over" in out  # the killed job's .partial and lock
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step[0-9]*[0-9]"))
    assert len(saved) == 1 and 1 <= int(saved[0][4:]) < 6
    states = [p.read_text() for p in (run_dir / "checkpoints" / saved[0]).glob("trainer_state_rank*.json")]
    assert len(states) == 2 and not (run_dir / "run.lock").exists()


def test_a_run_dir_each_rank_resolves_its_own_way_is_refused_before_anything_is_written(tmp_path, demo_shards):
    # Was: exit 0, each rank wrote out_0/ or out_1/, and no checkpoint held more than one rank's shards.
    base = tmp_path / "out"
    launcher = [*LAUNCH, "pretrain.train"]
    proc = run_train(launcher, Path(str(base) + "_${oc.env:RANK}"), demo_shards, "trainer.max_steps=2",
                     "logging.mode=disabled", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [f"error: run_dir differs between ranks: '{base}_0' on rank 0, '{base}_1' on rank 1; every rank "
                      f"of a run must resolve the same config (a per-rank ${{oc.env:...}} or a relative path in "
                      f"another directory?)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir()), "a rank wrote something"
    # Any other key that differs is named the same way.
    proc = run_train(launcher, tmp_path / "run", demo_shards, "trainer.max_steps=2", "logging.mode=disabled",
                     "seed=${oc.env:RANK}", check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith(
        "error: seed differs between ranks: 0 on rank 0, 1 on rank 1"), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()
