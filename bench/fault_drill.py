"""Fault drills: train the tiny model on 2 CPU ranks, inject a fault at a random step, re-run the same
command until the run finishes, and compare with an uninterrupted run: the losses of every step, the
samples every step trained on (none lost, none repeated), and the final weights and Adam state.

    .venv/bin/python bench/fault_drill.py --trials 2 --steps 12

Prints a table, one row per kind of fault, and one JSON line. The figures go to RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipeline.build import build  # noqa: E402
from pretrain.checkpoint.zero_files import optimizer_tensors  # noqa: E402
from tests.conftest import TRAIN_ARGS, build_config, demo_data_config, free_port  # noqa: E402

FAULTS = ("kill -9 rank", "SIGTERM rank", "SIGUSR1 launcher", "kill -9 launcher")


def command(run_dir: Path, data_dir: Path, steps: int, slow_step: int) -> list[str]:
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                "--module", "pretrain.train"]
    return [*launcher, *TRAIN_ARGS, f"data.dir={data_dir}", f"run_dir={run_dir}", f"trainer.max_steps={steps}",
            "trainer.ckpt_every=3", "fault.record_samples=true", "logging.mode=disabled", "cluster.timeout_s=30",
            # one step 3 s longer (no effect on the numbers), so that a fault lands before the run ends
            f"fault.sleep_at_step={slow_step}", "fault.sleep_s=3"]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**e, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines()), default=0)


def ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if " -m pretrain.train " in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def attempt_with_fault(cmd: list[str], run_dir: Path, fault: str, at_step: int) -> int:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while proc.poll() is None and logged_steps(run_dir) < at_step:
        time.sleep(0.05)
    if proc.poll() is None:
        victims = {"kill -9 rank": (lambda: ranks(proc)[-1], signal.SIGKILL),
                   "SIGTERM rank": (lambda: ranks(proc)[0], signal.SIGTERM),
                   "SIGUSR1 launcher": (lambda: psutil.Process(proc.pid), signal.SIGUSR1),
                   "kill -9 launcher": (lambda: psutil.Process(proc.pid), signal.SIGKILL)}
        pick, sig = victims[fault]
        pick().send_signal(sig)
    try:
        return proc.wait(timeout=300)
    finally:
        # A killed launcher returns at once; its ranks notice within a second, save and exit.
        _, left = psutil.wait_procs([p for p in psutil.process_iter() if _uses(p, run_dir)], timeout=120)
        for p in left:
            p.kill()
        if left:
            print(f"  {len(left)} processes left behind 120 s after {fault}", flush=True)


def _uses(p: psutil.Process, run_dir: Path) -> bool:
    try:
        return f"run_dir={run_dir}" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def finish(cmd: list[str], tries: int = 3) -> int:
    for n in range(1, tries + 1):
        if subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True).returncode == 0:
            return n
    raise RuntimeError(f"the run did not finish in {tries} re-runs: {' '.join(cmd)}")


def outcome(run_dir: Path, steps: int) -> dict:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            losses[r["step"]] = r["loss"]
    samples = Counter()
    for path in (run_dir / "samples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            samples.update(tuple(s) for s in json.loads(line)["samples"])
    tensors = optimizer_tensors(run_dir / "checkpoints" / f"step{steps:08d}")
    return {"losses": losses, "samples": samples, "tensors": tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=2, help="trials per kind of fault")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS), metavar="FAULT",
                        help=f"which faults to drill (default: all of {', '.join(FAULTS)})")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="fault-drill-"))
    data_dir = root / "data"
    build(demo_data_config(data_dir), build_config())

    reference_dir = root / "reference"
    finish(command(reference_dir, data_dir, args.steps, slow_step=args.steps))
    reference = outcome(reference_dir, args.steps)

    rows = []
    for fault in args.faults:
        row = {"fault": fault, "trials": 0, "survived": 0, "reruns": 0, "lost": 0, "repeated": 0,
               "weights_equal": 0, "max_loss_diff": 0.0}
        for trial in range(args.trials):
            run_dir = root / f"{fault.replace(' ', '_')}-{trial}"
            at_step = rng.randint(2, args.steps - 2)
            cmd = command(run_dir, data_dir, args.steps, slow_step=at_step + 1)
            code = attempt_with_fault(cmd, run_dir, fault, at_step)
            saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step[0-9]*[0-9]"))
            reruns = finish(cmd)
            got = outcome(run_dir, args.steps)
            row["trials"] += 1
            row["reruns"] += reruns
            row["survived"] += sorted(got["losses"]) == list(range(1, args.steps + 1))
            row["lost"] += sum((reference["samples"] - got["samples"]).values())
            row["repeated"] += sum((got["samples"] - reference["samples"]).values())
            row["weights_equal"] += len(got["tensors"]) == len(reference["tensors"]) and all(
                torch.equal(a, b) for a, b in zip(got["tensors"], reference["tensors"]))  # noqa: B905
            row["max_loss_diff"] = max(row["max_loss_diff"], max(
                abs(got["losses"].get(s, float("inf")) - loss) for s, loss in reference["losses"].items()))
            print(f"  {fault} at step {at_step}: exit {code}, newest checkpoint {saved[-1] if saved else None}, "
                  f"finished after {reruns} re-run(s)", flush=True)
        rows.append(row)

    print("| fault | trials | survived | re-runs | samples lost | samples repeated | final weights equal "
          "| max loss diff |")
    print("|" + "---|" * 8)
    for r in rows:
        print(f"| {r['fault']} | {r['trials']} | {r['survived']} | {r['reruns']} | {r['lost']} | {r['repeated']} | "
              f"{r['weights_equal']}/{r['trials']} | {r['max_loss_diff']:.1e} |")
    print(json.dumps({"steps": args.steps, "samples_per_run": sum(reference["samples"].values()), "rows": rows}))


if __name__ == "__main__":
    main()
