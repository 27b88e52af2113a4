"""A real SLURM cluster of N nodes on this one machine, loopback only, for tests and for trying the
SLURM path on a laptop (Debian's slurm-wlm, run as root).

slurmctld runs as is; each `slurmd -D -N nodeK` runs in its own mount and hostname namespace
(`unshare -m -u`) with a private hosts file bind-mounted over /etc/hosts that maps every node name to
127.0.0.1, and `hostname nodeK`: jobs see real node names, and a MASTER_ADDR taken from
`scontrol show hostnames` resolves. auth/none, no munge, no cgroups. Ports are free ones picked at
start (or given), so two clusters on one machine do not collide.

    python -m launch.local_cluster up [--nodes 2] [--dir /tmp/llada-slurm]   # prints: export SLURM_CONF=...
    python -m launch.local_cluster down [--dir /tmp/llada-slurm]

Daemons are stopped by PID (recorded in DIR/pids.json); so is every process still carrying this
cluster's SLURM_CONF in its environment (job steps that outlive a stopped slurmd).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CONF = """\
ClusterName=llada-local
SlurmctldHost={ctld_host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
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
KillWait=5
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel", "unshare")


def slurm_available() -> bool:
    return all(shutil.which(b) for b in BINARIES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_names(nodes: int) -> list[str]:
    return [f"node{i + 1}" for i in range(nodes)]


class LocalCluster:
    """slurmctld + N slurmd under `root`. `start()` returns the environment (SLURM_CONF) under which
    sbatch, squeue, scontrol talk to this cluster; `stop()` cancels every job and ends every process."""

    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2, ports: list[int] | None = None):
        self.root = Path(root).resolve()
        self.names = node_names(nodes)
        self.cpus = cpus_per_node
        self.ports = ports or [free_port() for _ in range(nodes + 1)]  # slurmctld, then one per slurmd
        if len(self.ports) != nodes + 1:
            raise ValueError(f"ports: need {nodes + 1} (slurmctld + {nodes} slurmd), got {self.ports}")
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: list[int] = []

    @classmethod
    def from_record(cls, root: Path) -> LocalCluster:
        """The cluster that `start()` recorded in root/pids.json (for `down` from another process)."""
        saved = json.loads((Path(root) / "pids.json").read_text())
        text = Path(saved["conf"]).read_text()
        cluster = cls(root, nodes=text.count("\nNodeName="), ports=saved["ports"])
        cluster.pids = saved["pids"]
        return cluster

    def write_config(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} State=UNKNOWN"
                          for n, p in zip(self.names, self.ports[1:], strict=True))
        self.conf.write_text(CONF.format(ctld_host=socket.gethostname().split(".")[0], ctld_port=self.ports[0],
                                         root=self.root, nodes=nodes, node_list=",".join(self.names)))
        # Each node's private /etc/hosts: the machine's own lines, plus every node name on loopback.
        base = Path("/etc/hosts").read_text() if Path("/etc/hosts").is_file() else "127.0.0.1 localhost\n"
        (self.root / "hosts").write_text(base.rstrip("\n") + "\n127.0.0.1 " + " ".join(self.names) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> int:
        log = open(self.root / f"{name}.stderr", "w")
        proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        log.close()
        self.pids.append(proc.pid)
        return proc.pid

    def start(self, timeout: float = 60) -> dict:
        self.write_config()
        (self.root / "state" / "clustername").unlink(missing_ok=True)  # a reused dir with another layout
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for n in self.names:
            # unshare without --fork execs in place: the PID we record is slurmd's own.
            self._spawn(f"slurmd-{n}", [
                "unshare", "-m", "-u", "sh", "-c",
                f'mount --bind "$0" /etc/hosts && hostname {n} && exec slurmd -D -N {n} -f "$1"',
                str(self.root / "hosts"), str(self.conf)])
        self.save_pids()
        try:
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self.env

    def save_pids(self) -> None:
        (self.root / "pids.json").write_text(json.dumps({"pids": self.pids, "conf": str(self.conf),
                                                         "ports": self.ports}))

    def wait_idle(self, timeout: float) -> None:
        deadline, states = time.time() + timeout, []
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = [line.split() for line in out.stdout.splitlines()]
            if len(states) == len(self.names) and all(s[1] in ("idle", "mix", "alloc") for s in states):
                return
            time.sleep(0.5)
        logs = "".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.root.glob("*.log")))
        raise RuntimeError(f"the local SLURM cluster in {self.root} did not come up (nodes: {states})\n{logs}")

    def stop(self) -> None:
        """Cancel every job, then end the daemons and whatever they left, each by its PID."""
        if self.pids and _alive(self.pids[0]):
            subprocess.run(["scancel", "--full", "-u", str(os.getuid())], env=self.env, capture_output=True)
            subprocess.run(["scancel", "-u", str(os.getuid())], env=self.env, capture_output=True)
            _wait_gone(lambda: processes_of(self.conf, job_id="*"), 15)
        _terminate(self.pids)
        _terminate(processes_of(self.conf))
        self.pids = []
        (self.root / "pids.json").unlink(missing_ok=True)

    def __enter__(self) -> dict:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").is_dir() and "zombie" not in _status(pid)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


def _wait_gone(pids_fn, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not [p for p in pids_fn() if _alive(p)]:
            return True
        time.sleep(0.3)
    return False


def _terminate(pids: list[int], grace: float = 20) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if not _wait_gone(lambda: pids, grace):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_gone(lambda: pids, 5)
    for pid in pids:  # reap the ones that are our children
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def processes_of(conf: Path, job_id: str | None = None) -> list[int]:
    """PIDs of the processes whose environment carries this cluster's SLURM_CONF (and, if given,
    SLURM_JOB_ID=job_id; "*": any job): the daemons, their job steps and every rank they started."""
    want = f"SLURM_CONF={conf}".encode()
    job = f"SLURM_JOB_ID={job_id}".encode() if job_id and job_id != "*" else None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        in_job = any(v.startswith(b"SLURM_JOB_ID=") for v in environ) if job_id == "*" else True
        if want in environ and (job is None or job in environ) and in_job:
            found.append(int(entry.name))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.local_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", default=os.environ.get("LLADA_SLURM_DIR", "/tmp/llada-slurm"),
                        help="where slurm.conf, state, logs and pids.json live")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="CPUs per node")
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    if args.action == "up":
        if not slurm_available():
            sys.exit("error: slurmctld/slurmd/unshare not found; install Debian's slurm-wlm (make system-deps)")
        if (root / "pids.json").is_file():
            sys.exit(f"error: {root}/pids.json exists: a cluster is up there (`down --dir {root}` first)")
        cluster = LocalCluster(root, nodes=args.nodes, cpus_per_node=args.cpus)
        cluster.start()
        subprocess.run(["sinfo", "-N"], env=cluster.env)
        print(f"export SLURM_CONF={cluster.conf}")
        return
    record = root / "pids.json"
    if not record.is_file():
        sys.exit(f"error: {record} not found: no cluster is up in {root}")
    LocalCluster.from_record(root).stop()
    print(f"stopped the cluster in {root}")


if __name__ == "__main__":
    main()
