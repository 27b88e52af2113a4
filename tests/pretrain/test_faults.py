"""Fault injection on the real entry point: 2 CPU ranks (gloo) under the deepspeed launcher and
torchrun, each fault followed by a resume that must end with the uninterrupted run's losses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pretrain.checkpoint.zero_files import optimizer_tensors
from pretrain.faults import EXIT_NON_FINITE, EXIT_PREEMPTED, is_launcher, launcher_ancestors
from tests.conftest import BIN, REPO, TRAIN_ARGS, child_env, free_port, read_metrics, run_train, train_losses

PYTHON = [sys.executable, "-m", "pretrain.train"]
STEPS = 8


def deepspeed_launcher() -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pretrain.train"]


def torchrun_launcher() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "pretrain.train"]


def start(launcher, run_dir: Path, data_dir: Path, *overrides: str) -> subprocess.Popen:
    cmd = [*launcher, *TRAIN_ARGS, f"data.dir={data_dir}", f"run_dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(r.get("step", 0) >= step for r in read_metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before step {step}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def ranks_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training processes below a launcher (deepspeed: runner -> launch.py -> ranks)."""
    def cmdline(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # a short-lived helper process ended meanwhile
            return ""

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if " -m pretrain.train " in cmdline(p)]
        if len(ranks) == 2:
            return ranks
        time.sleep(0.1)
    raise AssertionError("did not find the two ranks")


def processes_using(run_dir: Path) -> list[psutil.Process]:
    left = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if f"run_dir={run_dir}" in " ".join(p.info["cmdline"] or []):
                left.append(p)
        except psutil.Error:
            pass
    return left


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def assert_same_losses(expected: dict[int, float], got: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected), (sorted(expected), sorted(got))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), (step, loss, got[step])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_shards) -> dict[int, float]:
    """The reference: 2 ranks, STEPS steps, no fault."""
    run_dir = tmp_path_factory.mktemp("faults") / "straight"
    run_train(torchrun_launcher(), run_dir, demo_shards, f"trainer.max_steps={STEPS}", timeout=600)
    return train_losses(run_dir)


@pytest.mark.parametrize("target,sig", [("rank", signal.SIGUSR1), ("launcher", signal.SIGTERM)])
def test_preemption_signal_saves_at_an_agreed_step_and_the_rerun_finishes_identically(
        tmp_path, demo_shards, uninterrupted, target, sig):
    run_dir = tmp_path / "run"
    # Step 3 of rank 0 takes 3 s longer (no effect on the numbers), so the signal lands before the run ends.
    slow = ["fault.sleep_at_step=3", "fault.sleep_s=3"]
    proc = start(deepspeed_launcher(), run_dir, demo_shards, f"trainer.max_steps={STEPS}", *slow)
    wait_for_step(proc, run_dir, 2)
    victim = ranks_of(proc)[1].pid if target == "rank" else proc.pid  # deepspeed's runner
    psutil.Process(victim).send_signal(sig)
    code, out, err = finish(proc)
    time.sleep(1)
    assert not processes_using(run_dir), "a rank outlived its job"
    if target == "rank":  # deepspeed's launcher passes the ranks' exit code on
        assert code == EXIT_PREEMPTED, err[-3000:]
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step[0-9]*[0-9]"))
    assert saved, f"no checkpoint after {sig.name} to the {target}:\n{err[-3000:]}"
    stop_step = int(saved[-1][4:])
    assert 2 <= stop_step < STEPS
    states = [json.loads(p.read_text()) for p in (run_dir / "checkpoints" / saved[-1]).glob("trainer_state_rank*.json")]
    assert [s["step"] for s in states] == [stop_step, stop_step]  # both ranks stopped after the same step
    run_train(deepspeed_launcher(), run_dir, demo_shards, f"trainer.max_steps={STEPS}", timeout=600)
    assert_same_losses(uninterrupted, train_losses(run_dir))


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sigkill_of_the_launcher_ends_its_ranks_after_a_save(tmp_path, demo_shards, launcher):
    # torchrun is the ranks' parent (parent-death signal); deepspeed's runner is their grandparent,
    # above its launch.py, which lives on: the ranks must notice that one themselves.
    run_dir = tmp_path / "run"
    proc = start({"torchrun": torchrun_launcher, "deepspeed": deepspeed_launcher}[launcher](), run_dir, demo_shards,
                 "trainer.max_steps=400")
    wait_for_step(proc, run_dir, 1)
    ranks = ranks_of(proc)
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, "ranks trained on as orphans after their launcher was killed"
    assert all(p.returncode == EXIT_PREEMPTED for p in gone if p.returncode is not None)
    # They noticed the dead launcher, agreed on a step and saved it.
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step[0-9]*[0-9]"))
    assert saved and int(saved[-1][4:]) < 400


def test_sigkill_of_a_rank_ends_the_job_and_the_rerun_finishes_identically(tmp_path, demo_shards, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start(deepspeed_launcher(), run_dir, demo_shards, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=2")
    wait_for_step(proc, run_dir, 3)
    ranks_of(proc)[1].kill()
    started = time.monotonic()
    code, _, _ = finish(proc)
    assert code != 0 and time.monotonic() - started < 60
    assert not processes_using(run_dir)
    run_train(deepspeed_launcher(), run_dir, demo_shards, f"trainer.max_steps={STEPS}", "trainer.ckpt_every=2",
              timeout=600)
    assert_same_losses(uninterrupted, train_losses(run_dir))


def test_a_stopped_peer_fails_the_job_within_the_timeout(tmp_path, demo_shards):
    run_dir = tmp_path / "run"
    proc = start(deepspeed_launcher(), run_dir, demo_shards, "trainer.max_steps=400", "cluster.timeout_s=8")
    wait_for_step(proc, run_dir, 2)
    ranks = ranks_of(proc)
    ranks[1].suspend()  # SIGSTOP
    started = time.monotonic()
    try:
        code, _, err = finish(proc, timeout=180)
    finally:
        for p in ranks:
            if p.is_running():
                p.kill()
    elapsed = time.monotonic() - started
    assert code != 0
    # timeout_s for the collective, then up to 30 s for deepspeed's launcher to end the stopped rank.
    assert elapsed < 8 + 30 + 30, elapsed
    assert not processes_using(run_dir)
    # The surviving rank names the one that stopped answering (its heartbeat stopped), in one line.
    named = [line for line in err.splitlines() if "stopped answering" in line]
    assert named and named[0].startswith("error: rank 0: rank 1 stopped answering (no heartbeat for "), err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def param_and_optimizer_state(run_dir: Path, step: int) -> list[torch.Tensor]:
    tensors = optimizer_tensors(run_dir / "checkpoints" / f"step{step:08d}")
    assert tensors
    return tensors


def test_non_finite_steps_are_skipped_without_an_update(tmp_path, demo_shards):
    # A NaN loss on rank 1 only at steps 3 and 4: both ranks skip both updates, so the state saved at
    # the end (step 4) is the state saved after step 2, bit for bit.
    nan = ["fault.nan_steps=[3,4]", "fault.nan_ranks=[1]"]
    run_train(torchrun_launcher(), tmp_path / "nan", demo_shards, "trainer.max_steps=4", "trainer.ckpt_every=2",
              *nan, timeout=600)
    after_skips, before = param_and_optimizer_state(tmp_path / "nan", 4), param_and_optimizer_state(tmp_path / "nan", 2)
    assert len(after_skips) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(after_skips, before, strict=True)), "a skipped step changed the state"
    records = {r["step"]: r for r in read_metrics(tmp_path / "nan")}
    assert [records[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 2]
    # The lr schedule stays aligned with the step counter, also across a resume: step 5 gets the lr of step 5.
    run_train(torchrun_launcher(), tmp_path / "nan", demo_shards, "trainer.max_steps=5", *nan, timeout=600)
    lr5 = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "nan")}[5]
    assert lr5 == pytest.approx(3e-3)  # schedule [[0,0.1],[5,1.0]]: full lr from step 5


def test_too_many_non_finite_steps_stop_the_run_without_saving(tmp_path, demo_shards):
    run_dir = tmp_path / "run"
    run_train(PYTHON, run_dir, demo_shards, "trainer.max_steps=2")
    # ckpt_every=2: the step-4 checkpoint falls inside the bad streak and is not written.
    proc = run_train(PYTHON, run_dir, demo_shards, "trainer.max_steps=20", "fault.nan_steps=[3,4,5,6]",
                     "trainer.max_bad_steps=3", "trainer.ckpt_every=2", check=False)
    assert proc.returncode == EXIT_NON_FINITE, proc.stderr[-2000:]
    assert "error: step 5: 3 consecutive steps with a non-finite loss or gradient (trainer.max_bad_steps=3); " \
           "stopping without saving, the newest checkpoint, step 2, is the last good state" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step[0-9]*[0-9]")) == ["step00000002"]
    assert max(train_losses(run_dir)) == 5


def test_watchdog_dumps_the_stacks_of_a_hung_step_and_exits(tmp_path, demo_shards):
    proc = run_train(PYTHON, tmp_path / "run", demo_shards, "trainer.max_steps=6", "trainer.watchdog_s=4",
                     "fault.sleep_at_step=3", "fault.sleep_s=600", check=False, timeout=300)
    assert proc.returncode == 1
    assert "Timeout" in proc.stderr and "inject_loss_fault" in proc.stderr  # the stack of the hung step


def test_a_rank_started_by_hand_watches_no_launcher():
    # pytest (our parent) is not a launcher: closing a terminal must not stop a nohup'd run.
    assert launcher_ancestors() == []


@pytest.mark.parametrize("cmdline,expected", [
    (["/v/bin/python", "/v/bin/deepspeed", "--num_gpus", "2", "--module", "pretrain.train"], True),
    (["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"], True),
    (["/v/bin/python", "-m", "deepspeed.launcher.launch", "--world_info=x"], True),
    (["/v/bin/python", "/v/bin/torchrun", "--nproc_per_node", "2", "-m", "pretrain.train"], True),
    (["/v/bin/python", "-m", "torch.distributed.run", "--nproc_per_node", "2"], True),
    (["/v/bin/python", "-m", "launch.run", "--nproc_per_node", "2", "-m", "pretrain.train"], True),
    (["/v/bin/python", "-m", "pytest", "-k", "deepspeed or torchrun"], False),
    (["/bin/bash"], False),
])
def test_launchers_are_told_by_their_program_not_by_their_arguments(cmdline, expected):
    assert is_launcher(cmdline) == expected


def signal_the_job(proc: subprocess.Popen, sig: int) -> list[psutil.Process]:
    """`sig` to every process of the job at once, as scancel, a SLURM preemption or a time limit
    send it: the launcher, the ranks, and what they started (W&B's service, loader workers)."""
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return procs


def test_a_job_wide_sigterm_with_wandb_on_saves_and_stops_cleanly(tmp_path, demo_shards):
    # W&B's service process dies of the signal too; rank 0 used to crash at its next metrics log
    # (ConnectionResetError), the peer then failed in gloo, and no checkpoint was written. The signal
    # lands in the eval after step 3 (made endless here): it is abandoned, so that the checkpoint comes
    # before the SIGKILL that follows a job-wide SIGTERM (~30 s: SLURM's KillWait, deepspeed's launch.py).
    run_dir = tmp_path / "run"
    proc = start(deepspeed_launcher(), run_dir, demo_shards, f"trainer.max_steps={STEPS}", "logging.mode=offline",
                 "trainer.eval_every=3", "trainer.eval_batches=1000000")
    wait_for_step(proc, run_dir, 3)
    procs = signal_the_job(proc, signal.SIGTERM)
    assert any(p.name().startswith("wandb") for p in procs if p.is_running())
    _, out, err = finish(proc)
    assert "     3 | eval abandoned: received SIGTERM" in out, out[-3000:]
    assert not any("eval/loss" in r for r in read_metrics(run_dir))
    psutil.wait_procs(procs, timeout=60)
    assert not processes_using(run_dir), "a rank outlived its job"
    assert "Traceback" not in err and "Error executing job" not in err, err[-3000:]
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step[0-9]*[0-9]"))
    assert saved and saved[-1] == "step00000003", f"no step-3 checkpoint after a job-wide SIGTERM:\n{err[-3000:]}"
    states = [json.loads(p.read_text()) for p in (run_dir / "checkpoints" / saved[-1]).glob("trainer_state_rank*.json")]
    assert [s["step"] for s in states] == [int(saved[-1][4:])] * 2
    assert err.count("warning: W&B failed at step") <= 1
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, int(saved[-1][4:]) + 1))


def test_sigterm_to_the_runner_while_its_ranks_import_ends_them_before_training(tmp_path, demo_shards):
    # The launcher watch started only once the process group was up: by then the dead runner was no
    # longer in the ranks' chain of launchers, and they trained to max_steps holding the lock and the port.
    run_dir = tmp_path / "run"
    proc = start(deepspeed_launcher(), run_dir, demo_shards, "trainer.max_steps=400")
    ranks = ranks_of(proc)
    time.sleep(1.5)  # the ranks are importing torch and DeepSpeed (several seconds)
    assert not (run_dir / "metrics.jsonl").exists()
    proc.send_signal(signal.SIGTERM)
    code, _, _ = finish(proc)
    assert code == -signal.SIGTERM  # deepspeed's runner has no handler: it dies at once
    gone, alive = psutil.wait_procs(ranks, timeout=120)
    for p in alive:
        p.kill()
    assert not alive, "the ranks trained on after their runner died"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "run.lock").exists()
    assert not (run_dir / "metrics.jsonl").exists()  # no step was trained


def test_a_data_error_on_one_rank_mid_run_is_one_line_on_every_rank(tmp_path, demo_shards):
    # Token ids at or above the vocabulary in one block (the shard otherwise valid, the manifest agreeing):
    # they failed in the embedding as "IndexError: index out of range in self" with no shard named; and
    # a rank whose peer ended with an error printed a gloo traceback, or aborted ("terminate called
    # without an active exception", exit 134) after the right line.
    import shutil

    from data_pipeline.shards import Manifest
    from tests.data_pipeline.test_stream import rewrite_block

    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    manifest = Manifest.load(shards)
    info = manifest.splits["train"][7]

    def plant(tokens):
        tokens[0, 0] = manifest.vocab_size + 1
        return tokens

    key = rewrite_block(shards / info.name, 2, plant)
    launcher = [sys.executable, "-m", "launch.run", "--nproc_per_node", "2", "-m", "pretrain.train"]
    proc = run_train(launcher, tmp_path / "run", shards, "trainer.max_steps=400", "logging.mode=disabled",
                     check=False, timeout=400)
    assert proc.returncode == 2, proc.stderr[-3000:]
    for bad in ("Traceback", "Error executing job", "terminate called", "IndexError"):
        assert bad not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert 1 <= len(errors) <= 2
    assert f"error: {shards / info.name}: sample {key} has token id {manifest.vocab_size + 1} >= the vocabulary " \
           f"({manifest.vocab_size}, manifest.json)" in errors
    assert all("has token id" in e or "another rank is gone" in e for e in errors)
