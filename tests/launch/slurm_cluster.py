"""A real one-node SLURM cluster on loopback for tests: slurmctld + slurmd started from a generated
slurm.conf in a temporary directory (auth/none, no munge, no cgroups), stopped when the test ends."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

CONF = """\
ClusterName=llada-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MaxArraySize=100
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def slurm_available() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo"))


@contextmanager
def slurm_cluster(root: Path, ctld_port: int = 16817, slurmd_port: int = 16818):
    """Yields the environment (SLURM_CONF) under which sbatch/squeue talk to the test cluster."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(CONF.format(host=host, root=root, ctld_port=ctld_port, slurmd_port=slurmd_port,
                                cpus=os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([d, "-D", "-f", str(conf), *extra], env=env, stdout=subprocess.DEVNULL,
                                stderr=open(root / f"{d}.stderr", "w"), start_new_session=True)
               for d, extra in (("slurmctld", ["-i"]), ("slurmd", ["-N", host]))]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                break
            time.sleep(0.5)
        else:
            logs = "".join((root / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log")
                           if (root / f).exists())
            raise RuntimeError(f"the test SLURM cluster did not come up (node state {state!r})\n{logs}")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "-u", os.environ.get("USER", "root")], env=env, capture_output=True)
        for p in daemons:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in daemons:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


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
    out = subprocess.run(["scontrol", "show", "job", "-o", *job_ids[:1]], env=env, capture_output=True, text=True)
    return {"scontrol": out.stdout}
