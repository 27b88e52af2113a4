"""launch/slurm/pretrain.sbatch on a real two-node SLURM cluster (loopback, each node in its own
namespace, started by the test): 2 nodes x 1 CPU rank, ZeRO-3 over gloo, submitted with
launch/slurm/submit.sh exactly as from a login node."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch.local_cluster import LocalCluster, processes_of, slurm_available
from tests.conftest import REPO, TRAIN_ARGS, child_env, read_metrics, train_losses
from tests.launch.slurm_cluster import job_field, wait_for_jobs, wait_for_state

STEPS = 8
JOB_TIMEOUT = 300  # seconds; a job takes about a minute on a loaded 2-core machine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    assert slurm_available(), "slurmctld/slurmd/sbatch/unshare not found: `make test` installs Debian's slurm-wlm"
    local = LocalCluster(tmp_path_factory.mktemp("slurm2"), nodes=2, cpus_per_node=2)
    env = local.start()
    try:
        yield local, {**env, **child_env(), "PYTHON": sys.executable}
    finally:
        local.stop()


def submit(env: dict, cwd: Path, *overrides: str) -> str:
    out = subprocess.run([str(REPO / "launch/slurm/submit.sh"), "cluster=slurm_local", *overrides], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return re.search(r"submitted job (\d+)", out.stdout).group(1)


def job_log(run_dir: Path, job: str) -> str:
    return (run_dir / "slurm" / f"llada-{job}.out").read_text()


def wait_for_step(run_dir: Path, step: int, env: dict, job: str, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(r["step"] >= step for r in read_metrics(run_dir)):
            return
        state = job_field(env, job, "JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} {state} before step {step}"
        time.sleep(0.5)
    raise TimeoutError(f"job {job} did not reach step {step} in {timeout}s")


def training_args(run_dir: Path, data_dir: Path, steps: int = STEPS) -> list[str]:
    return [*TRAIN_ARGS, f"data.dir={data_dir}", f"run_dir={run_dir}", f"trainer.max_steps={steps}"]


@pytest.fixture(scope="module")
def uninterrupted(cluster, demo_shards, tmp_path_factory):
    """One complete 2-node job: its run_dir and job id (also the reference for the preemption test)."""
    _, env = cluster
    run_dir = tmp_path_factory.mktemp("slurm-run") / "run"
    # An override with a space and quotes: Hydra overrides reach the ranks unchanged.
    job = submit(env, run_dir.parent, *training_args(run_dir, demo_shards), "logging.name='slurm run'")
    assert wait_for_jobs(env, [job], timeout=JOB_TIMEOUT) == {job: "COMPLETED"}, job_log(run_dir, job)[-3000:]
    return run_dir, job


def test_two_node_job_trains_on_both_nodes_and_checkpoints(cluster, uninterrupted):
    _, env = cluster
    run_dir, job = uninterrupted
    log = job_log(run_dir, job)
    assert job_field(env, job, "ExitCode") == "0:0"
    assert "0: rank 0/2 on host node1" in log and "1: rank 1/2 on host node2" in log, log[-3000:]
    assert f"master node1:{20000 + int(job) % 20000};" in log  # MASTER_ADDR: the first host; the port from the job id
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # It learned: the cross-entropy per masked token falls (the ELBO-weighted loss swings with each step's
    # draw of t: a step of mostly small t has a low loss whatever the model knows).
    ce = {r["step"]: r["masked_ce"] for r in read_metrics(run_dir) if "masked_ce" in r}
    assert ce[STEPS] < ce[1] - 0.3, ce
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"
    assert json.loads((run_dir / "setup.json").read_text())["world_size"] == 2
    assert OmegaConf.load(run_dir / "config.yaml").logging.name == "slurm run"
    hostfile = (run_dir / "slurm" / f"hostfile-{job}").read_text()
    assert hostfile == "node1 slots=1\nnode2 slots=1\n"
    assert list((run_dir / "slurm").glob("llada-*.out")) == [run_dir / "slurm" / f"llada-{job}.out"]


def test_a_rank_killed_on_one_node_fails_the_job_and_leaves_no_process(cluster, demo_shards, tmp_path):
    """Under the torchrun variant (one job of about a minute tests both it and the failure path; the
    deepspeed launcher's failure path was measured the same: FAILED within seconds, nothing left)."""
    local, env = cluster
    run_dir = tmp_path / "run"
    job = submit(env, tmp_path, "cluster.slurm.launcher=torchrun", "cluster.timeout_s=60",
                 *training_args(run_dir, demo_shards, steps=10_000))
    wait_for_step(run_dir, 2, env, job)
    log = job_log(run_dir, job)
    assert "launcher torchrun" in log and "rank 0/2 on host node1" in log and "rank 1/2 on host node2" in log
    ranks = [pid for pid in processes_of(local.conf, job_id=job) if _is_rank(pid, rank=1)]
    assert len(ranks) == 1, ranks
    killed_at = time.time()
    os.kill(ranks[0], signal.SIGKILL)
    assert wait_for_jobs(env, [job], timeout=120) == {job: "FAILED"}, job_log(run_dir, job)[-3000:]
    assert time.time() - killed_at < 60  # cluster.timeout_s: a SIGKILLed peer is seen at once, a stopped one by then
    assert job_field(env, job, "ExitCode") != "0:0"
    assert processes_of(local.conf, job_id=job) == []  # nothing left on either node


def _is_rank(pid: int, rank: int) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"RANK={rank}".encode() in environ and b"pretrain.train" in cmdline


def test_preempted_job_saves_requeues_resumes_and_matches_the_uninterrupted_losses(cluster, demo_shards, tmp_path,
                                                                                    uninterrupted):
    local, env = cluster
    run_dir = tmp_path / "run"
    # Rank 0 dwells 10 s in step 3, so the signal lands before the last step however fast the steps are.
    job = submit(env, tmp_path, *training_args(run_dir, demo_shards), "fault.sleep_at_step=3", "fault.sleep_s=10")
    wait_for_step(run_dir, 2, env, job)
    # What SLURM does before a time limit or a preemption (--signal=B:USR1@N): USR1 to the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    wait_for_state(env, job, ("PENDING",), timeout=120)  # requeued; SLURM holds it ~120 s unless StartTime=now
    assert job_field(env, job, "Restarts") == "1"
    stopped_at = checkpoint_step(run_dir)
    assert 2 <= stopped_at < STEPS, stopped_at  # the ranks stopped early, after a saved step
    assert processes_of(local.conf, job_id=job) == []
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    assert wait_for_jobs(env, [job], timeout=JOB_TIMEOUT) == {job: "COMPLETED"}, job_log(run_dir, job)[-3000:]

    log = job_log(run_dir, job)  # one log file for both runs of the job (--open-mode=append)
    assert "got SIGUSR1" in log and "stopped early (exit 75)" in log and f"requeueing job {job}" in log, log[-3000:]
    assert f"job {job} (restart 1)" in log and f"at step {stopped_at}" in log
    assert checkpoint_step(run_dir) == STEPS
    reference = train_losses(uninterrupted[0])
    assert train_losses(run_dir) == reference  # every step once, the same losses as the uninterrupted run
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()  # the W&B run continues: one id, two runs
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(f"-{run_id}") for name in wandb_runs), wandb_runs


def checkpoint_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step"))
