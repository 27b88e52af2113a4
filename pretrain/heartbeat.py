"""Which rank stopped answering, when a collective times out.

A collective with a stopped peer (SIGSTOP, a debugger, a node swapping or hung) fails after
cluster.timeout_s with a message that names no rank. So every rank bumps a counter of its own in the
job's rendezvous store (the c10d TCPStore at MASTER_ADDR:MASTER_PORT, which every launcher sets up)
every `period` seconds, from a daemon thread; a stopped process stops bumping. When a collective
has timed out, `silent_ranks` reads the counters twice, two periods apart, and names the ranks
whose counter did not move. When the store itself does not answer, the rank that hosts it (rank 0
under deepspeed's launcher and launch.run) is the one that stopped.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import torch.distributed as dist

KEY = "llada/heartbeat/{rank}"
STORE_TIMEOUT_S = 5.0


class Heartbeat:
    def __init__(self, rank: int, world: int, period: float):
        self.rank, self.world, self.period = rank, world, period
        self._stop = threading.Event()

    def _client(self) -> dist.TCPStore:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False)

    def start(self) -> Heartbeat:
        threading.Thread(target=self._beat, name="rank-heartbeat", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        try:
            store = self._client()
        except Exception:  # no store to beat in (a one-process run, a store gone): nothing to say later
            return
        key = KEY.format(rank=self.rank)
        while not self._stop.is_set():
            try:
                store.add(key, 1)
            except Exception:
                pass  # the store's host stopped or is gone: the diagnosis sees it
            self._stop.wait(self.period)

    def silent_ranks(self) -> tuple[list[int], str]:
        """(ranks whose heartbeat did not move in two periods, how that was found). Takes ~2 periods."""
        try:
            store = self._client()
            keys = [KEY.format(rank=r) for r in range(self.world)]
            before = [store.add(k, 0) for k in keys]
            time.sleep(2 * self.period + 0.5)
            after = [store.add(k, 0) for k in keys]
        except Exception:
            if self.rank == 0:
                return [], "the rendezvous store does not answer"
            return [0], "it hosts the rendezvous store, which does not answer"
        silent = [r for r in range(self.world) if r != self.rank and after[r] == before[r]]
        return silent, f"no heartbeat for {2 * self.period + 0.5:.0f} s"


_current: Heartbeat | None = None


def start(rank: int, world: int, timeout_s: float) -> None:
    """Starts this rank's heartbeat; a period well below the collectives' timeout (at most 10 s)."""
    global _current
    stop()  # a sweep's previous job in this process
    if world > 1 and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        _current = Heartbeat(rank, world, period=min(max(timeout_s / 8, 0.5), 10.0)).start()


def stop() -> None:
    if _current is not None:
        _current.stop()


def stopped_peer_line(rank: int) -> str | None:
    """After a collective timed out: one line naming the ranks that stopped answering, or None."""
    if _current is None:
        return None
    silent, how = _current.silent_ranks()
    if not silent:
        return None
    names = ", ".join(str(r) for r in silent)
    return (f"rank {rank}: rank {names} stopped answering ({how}; a collective timed out after cluster.timeout_s): "
            f"stopped (SIGSTOP, a debugger), swapping, or on a hung node")
