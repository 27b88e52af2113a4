"""DeepSpeed's engine files, loaded without running code from them.

DeepSpeed's `load_checkpoint` and `ds_to_universal` call `torch.load(weights_only=False)`: a full
unpickle, which runs whatever a file asks for. The checkpoint manifest (pretrain/checkpoint/files.py)
sits beside the files, so it is an integrity check, not trust: a file replaced together with the
manifest would run its code on resume. So every load of an engine file goes through torch's
weights-only unpickler, which builds tensors, containers and plain values and, beyond those, only
the classes listed here: the ones DeepSpeed 0.19 really pickles into its model-state and
optimizer-state files (fp32 and bf16, ZeRO stages 1-3) and into the universal form.

Three layers:
- `refusal(path)` reads a file's pickle opcodes without executing them (torch's static disassembly)
  and names what it would need beyond the allow-list: the resume check (choice._problem) refuses such a
  file in one line naming it, before anything is loaded, and falls back like on a damaged file.
- `weights_only_loads()` wraps DeepSpeed's own loading: TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes every
  torch.load weights-only even where the caller passes weights_only=False, with the allow-list added.
- the universal conversion runs in a child process through this module (`python -m
  pretrain.checkpoint.safe_load ds_to_universal ARGS`): the same environment variable and allow-list
  there, and in its worker processes (set at import, so a spawned worker has them too); the child
  also ends itself and its workers when the rank that started it dies.
"""

from __future__ import annotations

import os
import signal
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def allowed_globals() -> list:
    """What DeepSpeed's checkpoint files hold besides tensors, containers and plain values (found with
    torch.serialization.get_unsafe_globals_in_checkpoint over fp32 and bf16 runs and their universal
    form, DeepSpeed 0.19.8): the loss scaler object and the ZeRO stage enum, in the optimizer states.
    (fp16's DynamicLossScaler is not among them: this framework trains in bf16 or fp32.)
    pretrain/checkpoint/zero_files.py reads the same files with the same two classes allowed."""
    from contextlib import redirect_stdout

    with redirect_stdout(sys.stderr):  # DeepSpeed prints its accelerator choice on first import
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
    return [LossScaler, ZeroStageEnum]


def refusal(path: Path) -> str | None:
    """One line when `path` is not a file DeepSpeed writes or would unpickle anything beyond the
    allow-list; None when it loads weights-only. Nothing in the file is executed."""
    try:
        if not zipfile.is_zipfile(path):
            return f"{path}: not a torch zip file (DeepSpeed writes no other kind); refused without unpickling"
        with torch.serialization.safe_globals(allowed_globals()):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        text = str(e).strip().splitlines()
        return f"{path}: not a readable torch file ({type(e).__name__}: {text[0] if text else ''})"
    if unsafe:
        return (f"{path}: would unpickle {', '.join(sorted(unsafe)[:3])}, which DeepSpeed's checkpoint files never "
                f"hold; refused without unpickling (a file replaced along with the manifest?)")
    return None


def first_refusal(directory: Path) -> str | None:
    """The first .pt file under `directory` that `refusal` refuses (to name the file after torch refused one)."""
    for path in sorted(Path(directory).rglob("*.pt")):
        if problem := refusal(path):
            return problem
    return None


@contextmanager
def weights_only_loads():
    """Every torch.load in this block is weights-only (DeepSpeed's explicit weights_only=False included),
    with DeepSpeed's own classes allowed."""
    before = os.environ.get(FORCE)
    os.environ[FORCE] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(FORCE, None)
        else:
            os.environ[FORCE] = before


def is_weights_only_refusal(e: BaseException) -> bool:
    """torch's weights-only unpickler refused something (its UnpicklingError)."""
    import pickle

    return isinstance(e, pickle.UnpicklingError)


def universal_command(args: list[str]) -> list[str]:
    """The command that runs DeepSpeed's ds_to_universal with `args`, through this module."""
    return [sys.executable, "-m", "pretrain.checkpoint.safe_load", "ds_to_universal", *args]


def _die_with_parent(parent: int) -> None:
    """This process and its workers (its process group: the caller starts it in a session of its own)
    end when `parent` dies, even by kill -9: the kernel sends SIGTERM (PR_SET_PDEATHSIG), whose handler
    kills the whole group, so no worker goes on writing into a .partial directory a rerun rewrites.
    A SIGTERM, SIGUSR1 or SIGINT while the rank lives (a job-wide stop: scancel, a SLURM preemption) is the
    rank's to handle: the conversion finishes, then the rank stops."""
    import ctypes

    def end_group(signum, frame):
        if os.getppid() != parent:
            os.killpg(os.getpgid(0), signal.SIGKILL)

    signal.signal(signal.SIGTERM, end_group)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the job: the rank stops after the conversion
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    end_group(signal.SIGTERM, None)  # it died before prctl: the signal will not come


def _run_ds_to_universal(argv: list[str]) -> None:
    parent = os.environ.get("LLADA_CONVERT_PARENT")
    if parent:
        _die_with_parent(int(parent))
    os.environ[FORCE] = "1"  # inherited by the conversion's worker processes
    torch.serialization.add_safe_globals(allowed_globals())
    import runpy

    sys.argv = ["ds_to_universal", *argv]
    try:
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
    except Exception as e:
        if is_weights_only_refusal(e) or is_weights_only_refusal(e.__cause__ or e):
            print(f"error: a checkpoint file needs a class DeepSpeed's files never hold; refused without unpickling "
                  f"({str(e).strip().splitlines()[0]})", file=sys.stderr, flush=True)
            sys.exit(2)
        raise


if __name__ == "__main__" and sys.argv[1:2] == ["ds_to_universal"]:
    _run_ds_to_universal(sys.argv[2:])
elif __name__ == "__mp_main__":
    # A spawned worker of the conversion re-imports the main module: it gets the same allow-list.
    os.environ[FORCE] = "1"
    torch.serialization.add_safe_globals(allowed_globals())
