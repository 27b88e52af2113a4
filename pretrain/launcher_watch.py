"""A rank notices when a launcher that started it is gone, from its first line on.

Processes that start ranks (deepspeed's runner and its launch.py, torchrun, python -m launch.run)
form a chain of ancestors above a rank. A rank whose launcher dies must not train on as an orphan,
holding run_dir's lock and the rendezvous port: when one of them is gone, the watch raises the
stop flag (pretrain.faults.StopRequest), and the ranks stop at their next agreement (before
training, or after the step). The direct parent is covered at once by the parent-death signal
(SIGTERM); a thread polls the rest of the chain.

psutil only, no torch: `python -m pretrain.train` starts the watch before its heavy imports
(several seconds), so that a runner killed while its ranks import is noticed too. The chain is
recorded then: a dead runner's launch.py is adopted by init, and the chain found later would end
at launch.py.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import psutil

LAUNCHER_SCRIPTS = ("deepspeed", "torchrun", "launch.py", "runner.py", "run.py")
LAUNCHER_MODULES = ("deepspeed.launcher.runner", "deepspeed.launcher.launch", "torch.distributed.run",
                    "torch.distributed.launch", "launch.run")
PR_SET_PDEATHSIG = 1


def is_launcher(cmdline: list[str]) -> bool:
    """`deepspeed ...`, `torchrun ...` (as scripts or `python -m` modules, deepspeed's launch.py), and
    `python -m launch.run`."""
    args = cmdline[1:] if cmdline and Path(cmdline[0]).name.startswith("python") else cmdline
    while args and args[0] != "-m" and args[0].startswith("-"):  # interpreter flags: -u, -X opt, ...
        args = args[2:] if args[0] in ("-X", "-W") else args[1:]
    if len(args) >= 2 and args[0] == "-m":
        return args[1] in LAUNCHER_MODULES
    if not args:
        return False
    script = Path(args[0])
    return script.name in ("deepspeed", "torchrun") or (
        script.name in LAUNCHER_SCRIPTS and script.parent.name in ("launcher", "distributed"))


def launcher_ancestors(pid: int | None = None) -> list[psutil.Process]:
    """The chain of launcher processes above this one, nearest first; empty when the parent is not
    a launcher (a rank started by hand or by a test, which must outlive, say, a closed terminal)."""
    chain = []
    proc = psutil.Process(pid or os.getpid()).parent()
    while proc is not None and proc.pid > 1:
        try:
            if not is_launcher(proc.cmdline()):
                break
        except psutil.Error:
            break
        chain.append(proc)
        proc = proc.parent()
    return chain


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone between the two questions
        return False


class LauncherWatch:
    """Calls its listeners with a reason once a launcher above this rank is gone (killed, even with
    SIGKILL). A listener added after that is called at once."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.chain = launcher_ancestors()
        self.reason: str | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._started = False

    def start(self) -> LauncherWatch:
        if self._started or not self.chain:
            return self
        self._started = True
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        names = {}
        for proc in self.chain:  # a dead process can no longer be asked
            try:
                names[proc.pid] = proc.name()
            except psutil.Error:
                names[proc.pid] = "launcher"
        self._names = names
        if not alive(self.chain[0]):  # it died before prctl: the signal will not come
            self._gone("the launcher exited")
        threading.Thread(target=self._poll, args=(names,), name="launcher-watch", daemon=True).start()
        return self

    def _poll(self, names: dict[int, str]) -> None:
        self._names = names
        while not self._done.wait(self.interval_s):
            if self.check():
                return

    def check(self) -> bool:
        """Looks at the chain now (the thread looks every interval_s): True when a launcher is gone."""
        names = getattr(self, "_names", {})
        for proc in self.chain if self._started else ():
            if not alive(proc):
                self._gone(f"launcher process {proc.pid} ({names.get(proc.pid, 'launcher')}) is gone")
                return True
        return self.reason is not None

    def _gone(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason, listeners = reason, list(self._listeners)
        for listener in listeners:
            listener(reason)

    def notify(self, listener: Callable[[str], None]) -> None:
        with self._lock:
            self._listeners.append(listener)
            reason = self.reason
        if reason is not None:
            listener(reason)

    def close(self) -> None:
        self._done.set()


_watch: LauncherWatch | None = None


def watch() -> LauncherWatch:
    """This process's watch, started on first use (pretrain/train.py asks before its heavy imports)."""
    global _watch
    if _watch is None:
        _watch = LauncherWatch().start()
    return _watch
