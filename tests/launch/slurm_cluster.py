"""A real SLURM cluster on loopback for tests (launch/local_cluster.py): slurmctld and one slurmd per
node, each node in its own mount and hostname namespace, free ports, every process stopped by PID
when the test ends, pass or fail."""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from launch.local_cluster import LocalCluster, slurm_available  # noqa: F401  (re-exported for the tests)


@contextmanager
def slurm_cluster(root: Path, nodes: int = 1, cpus_per_node: int | None = None):
    """Yields the environment (SLURM_CONF) under which sbatch/squeue talk to the test cluster."""
    cluster = LocalCluster(root, nodes=nodes, cpus_per_node=cpus_per_node or os.cpu_count() or 1)
    env = cluster.start()
    try:
        yield env
    finally:
        cluster.stop()


def job_field(env: dict, job_id: str, field: str) -> str:
    """One field of `scontrol show job` (JobState, ExitCode, Restarts, ...); '' once the job is forgotten."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    for token in out.split():
        key, _, value = token.partition("=")
        if key == field:
            return value
    return ""


def wait_for_state(env: dict, job_id: str, states: tuple[str, ...], timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(env, job_id, "JobState")
        if state in states:
            return state
        time.sleep(0.5)
    raise TimeoutError(f"SLURM job {job_id} not in {states} after {timeout}s (state {state!r})")


def wait_for_jobs(env: dict, job_ids: list[str], timeout: float = 300) -> dict[str, str]:
    """Waits until none of the jobs is pending or running; returns each job's final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"], env=env, capture_output=True,
                               text=True).stdout.split()
        if not queue:
            break
        time.sleep(1)
    else:
        raise TimeoutError(f"SLURM jobs {job_ids} still queued after {timeout}s")
    return {job: job_field(env, job, "JobState") for job in job_ids}
