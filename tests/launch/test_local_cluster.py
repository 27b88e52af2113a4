"""launch/slurm/local_cluster.sh up|down: the two-node loopback cluster a person starts by hand."""

import os
import subprocess
import sys
from pathlib import Path

from launch.local_cluster import processes_of, slurm_available
from tests.conftest import REPO


def test_up_gives_two_named_nodes_that_resolve_and_down_leaves_nothing(tmp_path):
    assert slurm_available(), "slurmctld/slurmd/unshare not found: `make test` installs Debian's slurm-wlm"
    script, root = str(REPO / "launch/slurm/local_cluster.sh"), tmp_path / "cluster"
    env = {**os.environ, "PYTHON": sys.executable}
    up = subprocess.run([script, "up", "--dir", str(root), "--cpus", "1"], env=env, capture_output=True, text=True,
                        timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        conf = root / "slurm.conf"
        assert f"export SLURM_CONF={conf}" in up.stdout
        again = subprocess.run([script, "up", "--dir", str(root)], env=env, capture_output=True, text=True)
        assert again.returncode != 0 and "a cluster is up there" in again.stderr
        job_env = {**env, "SLURM_CONF": str(conf)}
        # Each task sees its node's name and resolves the first node (MASTER_ADDR) to loopback.
        out = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "--label", "sh", "-c",
                              'echo "$(hostname) $SLURM_NODEID $(getent hosts node1)"'],
                             env=job_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = sorted(" ".join(line.split()) for line in out.stdout.splitlines())
        assert lines == ["0: node1 0 127.0.0.1 node1 node2", "1: node2 1 127.0.0.1 node1 node2"]
        assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() not in ("node1", "node2")
    finally:
        down = subprocess.run([script, "down", "--dir", str(root)], env=env, capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0, down.stderr
    assert processes_of(Path(root / "slurm.conf")) == []
    assert not (root / "pids.json").exists()
