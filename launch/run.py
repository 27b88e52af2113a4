"""Start the ranks of one node and end when they end, with their exit code.

    python -m launch.run --nproc_per_node 2 -m pretrain.train model=tiny trainer.max_steps=200 run_dir=outputs/r2
    python -m launch.run --nnodes 2 --node_rank 0 --master_addr node1 --master_port 29500 --nproc_per_node 8 \\
        -m pretrain.train ...                                # one per node, e.g. under srun

Why not `deepspeed` or `torchrun` alone: on a SIGTERM (`kill`, a job scheduler's stop) deepspeed's
runner exits 143 at once while its ranks go on to finish the step, an eval and the save, and
torchrun kills its ranks 30 s after forwarding the signal; a wrapper that re-runs on exit code 75
then sees 143, and a re-run started at once meets the old ranks' port and run_dir lock. This
launcher is the ranks' parent and only that:

- The ranks get the environment deepspeed's launcher gives them (RANK, LOCAL_RANK, WORLD_SIZE,
  LOCAL_SIZE, MASTER_ADDR, MASTER_PORT, CROSS_RANK, CROSS_SIZE), so `pretrain.train` runs as under
  `deepspeed`.
- SIGTERM and SIGUSR1 are passed to every rank (a rank raises its stop flag: all finish the same
  step, save and exit 75; a rank still starting, before its process group is up, ends at once), and
  this command waits, without a time limit of its own, until every rank has ended. SIGINT is left to
  the ranks (a terminal's Ctrl-C reaches them all directly). Killed with SIGKILL, it leaves ranks that
  notice their launcher is gone, save and exit 75 (pretrain/launcher_watch.py).
- Its exit code is the ranks': 0 when all finished, 75 when they stopped and saved, otherwise a
  failed rank's own code (2 or 3, a rank's diagnosis, before 1, which a peer of a failed rank
  gives), 128 + N for a rank killed by signal N. When one rank fails, the others are given
  `--grace_s` to end (a collective with the failed rank fails at once), then killed.
- The rendezvous port: without --master_port on a single node a free one is picked (two runs on
  one machine never collide); a port given and in use is one error line saying how to pick
  another, exit 2, before any rank starts.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
import time

EXIT_USAGE = 2
PREEMPTED = 75  # pretrain.faults.EXIT_PREEMPTED (not imported: this launcher imports no torch)
RANK_DIAGNOSES = (2, 3)  # pretrain.faults: a config or data error, too many non-finite steps


def port_problem(port: int) -> str | None:
    """Why `port` cannot be the rendezvous port on this host (it is bound), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the ranks' TCP store binds it
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"MASTER_PORT={port} on {socket.gethostname()} is in use (another job, or one still "
                        f"finishing, holds it): pass another --master_port, or leave it out to get a free one")
            return f"MASTER_PORT={port}: cannot be bound ({e.strerror or e})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rank_env(base: dict, args, local_rank: int, port: int) -> dict:
    return {**base, "RANK": str(args.node_rank * args.nproc_per_node + local_rank), "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(args.nnodes * args.nproc_per_node), "LOCAL_SIZE": str(args.nproc_per_node),
            "LOCAL_WORLD_SIZE": str(args.nproc_per_node), "MASTER_ADDR": args.master_addr, "MASTER_PORT": str(port),
            "CROSS_RANK": str(args.node_rank), "CROSS_SIZE": str(args.nnodes)}


def exit_code(codes: list[int]) -> int:
    """The ranks' codes, in the order they ended, as the one this command returns."""
    failed = [c for c in codes if c not in (0, PREEMPTED)]
    if failed:
        return next((c for c in failed if c in RANK_DIAGNOSES), failed[0])
    return PREEMPTED if PREEMPTED in codes else 0


def status_code(status: int) -> int:
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class Ranks:
    def __init__(self, procs: list[subprocess.Popen], grace_s: float):
        self.procs, self.grace_s = procs, grace_s
        self.live = {p.pid: p for p in procs}
        self.codes: list[int] = []
        self.kill_at: float | None = None

    def forward(self, signum, frame) -> None:
        for pid in list(self.live):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def wait(self) -> int:
        while self.live:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                if self.kill_at is not None and time.monotonic() >= self.kill_at:
                    self.forward(signal.SIGKILL, None)
                    self.kill_at = None
                time.sleep(0.1)
                continue
            if pid not in self.live:
                continue
            self.live.pop(pid)
            code = status_code(status)
            self.codes.append(code)
            if code not in (0, PREEMPTED) and self.live and self.kill_at is None:
                self.kill_at = time.monotonic() + self.grace_s
        return exit_code(self.codes)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.run", description=__doc__.strip().splitlines()[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc_per_node", "--nproc", type=int, default=1, help="ranks on this node (default 1)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of the job (default 1)")
    p.add_argument("--node_rank", type=int, default=0, help="this node's index (default 0)")
    p.add_argument("--master_addr", default="127.0.0.1", help="the host of rank 0 (default 127.0.0.1)")
    p.add_argument("--master_port", type=int, default=None,
                   help="the rendezvous port (default: a free one, on a single node)")
    p.add_argument("--grace_s", type=float, default=60.0,
                   help="after a rank fails, how long the others may take to end before they are killed (default 60)")
    p.add_argument("-m", dest="module", required=True, help="the module each rank runs, e.g. pretrain.train")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (Hydra overrides for pretrain.train)")
    args = p.parse_args(argv)
    if args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        p.error(f"--nproc_per_node={args.nproc_per_node} and --nnodes={args.nnodes} must be >= 1, "
                f"0 <= --node_rank={args.node_rank} < --nnodes")
    port = args.master_port
    if port is None:
        if args.nnodes > 1:
            print("error: --master_port is needed with --nnodes > 1 (every node must name the same one)",
                  file=sys.stderr)
            return EXIT_USAGE
        port = free_port()
    elif args.node_rank == 0 and (problem := port_problem(port)):
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    ranks = Ranks([], args.grace_s)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, ranks.forward)
    for local in range(args.nproc_per_node):
        cmd = [sys.executable, "-u", "-m", args.module, *args.args]
        proc = subprocess.Popen(cmd, env=rank_env(base, args, local, port))
        ranks.procs.append(proc)
        ranks.live[proc.pid] = proc
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the ranks get a terminal's Ctrl-C themselves; wait for them
    code = ranks.wait()
    if code not in (0, PREEMPTED):
        print(f"launch.run: rank exit codes {ranks.codes} (in the order they ended); exit {code}", file=sys.stderr,
              flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
