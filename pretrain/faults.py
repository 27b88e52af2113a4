"""What a rank does when something goes wrong: preemption signals, a dead launcher, non-finite
steps, a hung step. Each fault ends in a documented exit code, never in an orphaned rank, a silent
exit 0 or a checkpoint of a broken state.

- SIGTERM / SIGUSR1 (SLURM's preemption and time-limit warning, torchrun forwarding a stop) and the
  death of the launcher that started this rank only raise a flag. At every step boundary the ranks
  all-reduce their flags, so they all stop after the same step, save, and exit EXIT_PREEMPTED.
- A non-finite gradient norm (from a NaN/inf loss or an overflow) skips the optimizer update on every
  rank (ZeRO-3 decides it from the global norm), the data and the lr schedule still advance, and after
  `trainer.max_bad_steps` consecutive skips the run stops with EXIT_NON_FINITE without saving, so
  the last good checkpoint stays the newest.
- The watchdog: no step finished for `trainer.watchdog_s` seconds dumps every thread's Python stack
  (faulthandler, which works even when the main thread is stuck in C code) and exits with code 1.
- A peer that dies or stops: collectives time out after `cluster.timeout_s` (the process group's
  timeout, set in engine.init_distributed), the rank exits non-zero, the launcher ends the rest.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import signal
import sys
import threading
from pathlib import Path

import psutil
import torch

from pretrain.config import FaultConfig
from pretrain.monitor.metrics import trim_jsonl

EXIT_CONFIG = 2  # a config or data error, found before any training
EXIT_NON_FINITE = 3  # trainer.max_bad_steps consecutive non-finite steps
EXIT_PREEMPTED = 75  # stopped by a signal or a dead launcher after saving a checkpoint (EX_TEMPFAIL): re-run to resume

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Processes that start ranks: a rank watches its chain of such ancestors (deepspeed's runner and its
# launch.py, torchrun), and stops when one of them is gone.
LAUNCHER_SCRIPTS = ("deepspeed", "torchrun", "launch.py", "runner.py", "run.py")
LAUNCHER_MODULES = ("deepspeed.launcher.runner", "deepspeed.launcher.launch", "torch.distributed.run",
                    "torch.distributed.launch")
PR_SET_PDEATHSIG = 1


class StopRequest:
    """A flag raised by a stop signal or a dead launcher; ranks agree on it at step boundaries."""

    def __init__(self):
        self.reason: str | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = f"received {signal.Signals(signum).name}"
            print(f"rank {os.environ.get('RANK', '0')}: {self.reason}; stopping after this step", file=sys.stderr,
                  flush=True)

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def agree(self, any_rank_asked: bool) -> bool:
        """Takes the all-reduced flag (the loop reduces it with its other step-boundary flags)."""
        if any_rank_asked and self.reason is None:
            self.reason = "another rank was asked to stop"
        return any_rank_asked


def is_launcher(cmdline: list[str]) -> bool:
    """`deepspeed ...`, `torchrun ...` (as scripts or `python -m` modules, deepspeed's launch.py)."""
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


class LauncherWatch:
    """Raises the stop flag when a launcher above this rank is gone (killed, even with SIGKILL), so
    ranks never train on as orphans. The parent-death signal covers the direct parent at once; a
    thread polls the rest of the chain (deepspeed's runner sits above its launch.py)."""

    def __init__(self, stop: StopRequest, interval_s: float = 1.0):
        self.stop, self.interval_s = stop, interval_s
        self.chain = launcher_ancestors()
        self._done = threading.Event()

    def start(self) -> None:
        if not self.chain:
            return
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if not self.chain[0].is_running():  # it died before prctl: the signal will not come
                self.stop.request("the launcher exited")
        threading.Thread(target=self._poll, name="launcher-watch", daemon=True).start()

    def _poll(self) -> None:
        names = {proc.pid: proc.name() for proc in self.chain}  # a dead process can no longer be asked
        while not self._done.wait(self.interval_s):
            for proc in self.chain:
                if not alive(proc):
                    self.stop.request(f"launcher process {proc.pid} ({names[proc.pid]}) is gone")
                    return

    def close(self) -> None:
        self._done.set()


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone between the two questions
        return False


class Watchdog:
    """Exits the process (code 1) with every thread's stack on stderr when `kick` is not called for
    `timeout_s` seconds. 0 disables it."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def kick(self) -> None:
        if self.timeout_s > 0:
            faulthandler.dump_traceback_later(self.timeout_s, repeat=False, file=sys.stderr, exit=True)

    def close(self) -> None:
        faulthandler.cancel_dump_traceback_later()


def finish_step(engine) -> bool:
    """After the accumulation boundary: True when DeepSpeed skipped the update. ZeRO-3 skips a step
    whose global gradient norm is not finite (a NaN/inf loss gives one), leaving parameters and Adam
    state untouched and zeroing the gradients, but it then also skips the lr scheduler's step; we take
    that step here, so the schedule stays aligned with the step counter (and with a resumed run)."""
    skipped = not engine.was_step_applied()
    if skipped and engine.lr_scheduler is not None:
        engine.lr_scheduler.step()
    return skipped


class NonFiniteSteps:
    """Counts skipped steps; raises the stop with a message after `max_bad` in a row."""

    def __init__(self, max_bad: int):
        self.max_bad, self.in_a_row, self.total = max_bad, 0, 0

    def record(self, skipped: bool, step: int) -> str | None:
        if not skipped:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        self.total += 1
        if self.max_bad and self.in_a_row >= self.max_bad:
            return (f"step {step}: {self.in_a_row} consecutive steps with a non-finite loss or gradient "
                    f"(trainer.max_bad_steps={self.max_bad}); stopping without saving, the newest checkpoint "
                    f"is the last good state")
        return None


def inject_loss_fault(loss: torch.Tensor, fault: FaultConfig, step: int, rank: int) -> torch.Tensor:
    """Test and drill hook: NaN losses and sleeps at configured steps (all off by default)."""
    if step in fault.nan_steps and (fault.nan_ranks is None or rank in fault.nan_ranks):
        loss = loss * float("nan")
    if fault.sleep_at_step == step and rank == fault.sleep_rank:
        import time

        time.sleep(fault.sleep_s)
    return loss


class SampleLog:
    """For drills: each rank writes the (epoch, window id) pairs every step trained on, one JSON line per
    step, so a trial can show that a fault and its resume lost or repeated no sample. Steps past the
    one training resumes from, written by an interrupted attempt, are dropped first."""

    def __init__(self, run_dir: str, rank: int, start_step: int):
        self.path = Path(run_dir) / "samples" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        trim_jsonl(self.path, start_step)
        self.pending: list[list[int]] = []

    def add(self, batch: dict) -> None:
        self.pending += [[int(e), int(i)] for e, i in zip(batch["epoch"].tolist(), batch["ids"].tolist())]  # noqa: B905

    def flush(self, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "samples": self.pending}) + "\n")
        self.pending = []
