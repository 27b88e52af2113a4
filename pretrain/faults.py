"""What a rank does when something goes wrong: preemption signals, a dead launcher, non-finite
steps, a hung step. Each fault ends in a documented exit code, never in an orphaned rank, a silent
exit 0 or a checkpoint of a broken state.

- SIGTERM / SIGUSR1 (SLURM's preemption and time-limit warning, torchrun forwarding a stop), a first
  SIGINT (Ctrl-C; a second one ends the rank at once, by the signal's default action) and the
  death of the launcher that started this rank (pretrain/launcher_watch.py, watched from the rank's
  first line) only raise a flag. At every step boundary the ranks all-reduce their flags, so they
  all stop after the same step, save, and exit EXIT_PREEMPTED; a flag raised during start-up is
  agreed before training (stop_agreed), and the ranks exit EXIT_PREEMPTED without training.
- A non-finite gradient norm (from a NaN/inf loss or an overflow) skips the optimizer update on every
  rank (ZeRO-3 decides it from the global norm), the data and the lr schedule still advance, and after
  `trainer.max_bad_steps` consecutive skips the run stops with EXIT_NON_FINITE without saving, so
  the last good checkpoint stays the newest.
- The watchdog: no step finished for `trainer.watchdog_s` seconds dumps every thread's Python stack
  (faulthandler, which works even when the main thread is stuck in C code) and exits with code 1.
- A peer that dies or stops: collectives time out after `cluster.timeout_s` (the process group's
  timeout, set in engine.init_distributed), the rank exits non-zero, the launcher ends the rest. On
  a timeout the surviving rank names the rank that stopped answering (pretrain/heartbeat.py).
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.config import FaultConfig
from pretrain.launcher_watch import LauncherWatch, is_launcher, launcher_ancestors, watch  # noqa: F401
from pretrain.monitor.metrics import trim_jsonl

EXIT_CONFIG = 2  # a config or data error, found before any training
EXIT_NON_FINITE = 3  # trainer.max_bad_steps consecutive non-finite steps
EXIT_PREEMPTED = 75  # stopped by a signal or a dead launcher after saving a checkpoint (EX_TEMPFAIL): re-run to resume

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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
        if signum == signal.SIGINT:
            # A second Ctrl-C ends the rank at once, whatever it is doing (even inside a collective or a
            # save, where a Python handler would wait): the kernel's default action, no traceback. A
            # half-written save stays a .partial folder, which no resume loads and the next save removes.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.reason is None:
            self.reason = f"received {signal.Signals(signum).name}"
            again = "; Ctrl-C again stops at once without saving" if signum == signal.SIGINT else ""
            print(f"rank {os.environ.get('RANK', '0')}: {self.reason}; stopping after this step{again}",
                  file=sys.stderr, flush=True)

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def agree(self, any_rank_asked: bool) -> bool:
        """Takes the all-reduced flag (the loop reduces it with its other step-boundary flags)."""
        if any_rank_asked and self.reason is None:
            self.reason = "another rank was asked to stop"
        return any_rank_asked


def stop_agreed(stop: StopRequest) -> bool:
    """Whether any rank was asked to stop (a signal, a dead launcher), agreed by all ranks: before
    training, where the loop's step-boundary agreement does not run yet."""
    watch().check()  # a launcher that died a moment ago, before the watch's next look
    reasons: list = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, stop.reason)
    return stop.agree(any(r is not None for r in reasons))


def peer_lost(e: BaseException) -> bool:
    """A collective failed because another rank is gone (it ended with its own error, or was killed):
    gloo's 'Connection closed by peer' / 'reset by peer', NCCL's remote errors, c10d's DistError."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (timed_out(e) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "remote process exited",
                            "NCCL communicator was aborted")))


def timed_out(e: BaseException) -> bool:
    """A collective gave up waiting (gloo: "Timed out waiting 8000ms for recv ..."): a peer that stopped
    answering rather than one that is gone (pretrain/heartbeat.py then names it)."""
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def exit_now(code: int) -> None:
    """Ends the process with `code` after its exit handlers (the run lock's release, W&B) and with its
    output flushed, but without the interpreter's teardown once a process group exists: after a
    peer is gone, the C++ destructors of the group's threads could abort the process after the
    right one-line error ("terminate called without an active exception", exit 134)."""
    if not dist.is_initialized():
        sys.exit(code)
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def watch_launchers(stop: StopRequest) -> LauncherWatch:
    """Raises `stop` when a launcher above this rank is gone (pretrain/launcher_watch.py), including
    one that died before this was called: the watch runs from the rank's first line."""
    launchers = watch()
    launchers.notify(stop.request)
    return launchers


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

    def record(self, skipped: bool, step: int, saved_step: int | None = None) -> str | None:
        """`saved_step`: this run's newest checkpoint (the loop saves none in a streak), named in the message."""
        if not skipped:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        self.total += 1
        if self.max_bad and self.in_a_row >= self.max_bad:
            newest = ("no checkpoint was written" if saved_step is None else
                      f"the newest checkpoint, step {saved_step}, is the last good state"
                      if saved_step <= step - self.in_a_row else f"the newest checkpoint is step {saved_step}")
            return (f"step {step}: {self.in_a_row} consecutive steps with a non-finite loss or gradient "
                    f"(trainer.max_bad_steps={self.max_bad}); stopping without saving, {newest}")
        return None

    @property
    def in_streak(self) -> bool:
        """The last step was skipped: a scheduled checkpoint now would save the middle of a bad streak."""
        return self.in_a_row > 0


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
