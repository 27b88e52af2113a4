"""Fault drills: train the tiny model on 2 CPU ranks, inject a fault at a random step, re-run the same
command until the run finishes, and compare with an uninterrupted run: the losses of every step, the
samples every step trained on (none lost, none repeated), and the final weights and Adam state.

    .venv/bin/python bench/fault_drill.py --trials 2 --steps 12
    .venv/bin/python bench/fault_drill.py --trials 3 --faults "SIGTERM job (W&B on)" "planted pickle"
    .venv/bin/python bench/fault_drill.py --smoke   # seconds: one planted pickle over 4 steps

Faults (all under deepspeed's launcher unless named otherwise):
- kill -9 rank, SIGTERM rank, SIGUSR1 launcher, kill -9 launcher: one process of the job.
- SIGTERM job (W&B on): every process of the job at once (what scancel, a SLURM preemption and a
  time limit do), with W&B offline, at a random step; `... during eval` lands while the held-out eval
  runs, `... during save` while a checkpoint is being written (one rank's writes slowed by 4 s).
- SIGTERM runner at start-up: deepspeed's runner alone, while its ranks still import (no process group yet).
- SIGTERM launch.run: the command alone, under python -m launch.run: its exit code must be the
  ranks' 75, and no rank may outlive it.
- planted pickle: the newest checkpoint's model states replaced by a pickle that would create a
  file when unpickled, the manifest updated to match; the re-run must refuse it by name, run none of
  it (no file) and resume from the checkpoint before.
- swapped shard: a valid train shard copied over another; the run must stop with one line naming
  it; the shard put back, the re-run finishes.
- out-of-vocabulary ids: one block of a shard holds an id >= the vocabulary (the manifest agreeing);
  the run must stop with one line naming the shard and sample; re-run with data.on_corrupt=skip, it
  finishes without that block's 16 windows (so its samples and weights differ from the reference).

Prints a table, one row per kind of fault, the trials one line each, and one JSON line. The figures
go to RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipeline.build import build  # noqa: E402
from data_pipeline.shards import Manifest  # noqa: E402
from pretrain.checkpoint.files import MANIFEST, digest  # noqa: E402
from pretrain.checkpoint.zero_files import optimizer_tensors  # noqa: E402
from tests.conftest import TRAIN_ARGS, build_config, demo_data_config, free_port  # noqa: E402

FAULTS = ("kill -9 rank", "SIGTERM rank", "SIGUSR1 launcher", "kill -9 launcher", "SIGTERM job (W&B on)",
          "SIGTERM job during eval", "SIGTERM job during save", "SIGTERM runner at start-up", "SIGTERM launch.run",
          "planted pickle", "swapped shard", "out-of-vocabulary ids")
SLOW_SAVE = REPO / "tests" / "pretrain" / "slow_save.py"
EVAL_EVERY = 3


def command(run_dir: Path, data_dir: Path, steps: int, slow_step: int, fault: str = "") -> list[str]:
    if fault == "SIGTERM launch.run":
        launcher = [sys.executable, "-m", "launch.run", "--nproc_per_node", "2", "-m", "pretrain.train"]
    else:
        script = [str(SLOW_SAVE)] if fault.endswith("during save") else ["--module", "pretrain.train"]
        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                    str(free_port()), *script]
    extra = []
    if "W&B" in fault or fault.startswith("SIGTERM job"):
        extra.append("logging.mode=offline")
    else:
        extra.append("logging.mode=disabled")
    if fault.endswith("during eval"):
        extra += [f"trainer.eval_every={EVAL_EVERY}", "trainer.eval_batches=150"]
    return [*launcher, *TRAIN_ARGS, f"data.dir={data_dir}", f"run_dir={run_dir}", f"trainer.max_steps={steps}",
            "trainer.ckpt_every=3", "fault.record_samples=true", "cluster.timeout_s=30",
            # fp32 on every host (auto is bf16 where the CPU has it natively): the figures compare hosts
            "trainer.precision=fp32",
            # one step 3 s longer (no effect on the numbers), so that a fault lands before the run ends
            f"fault.sleep_at_step={slow_step}", "fault.sleep_s=3", *extra]


def env(**extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**e, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def logged_steps(run_dir: Path) -> int:
    return max((r.get("step", 0) for r in records(run_dir)), default=0)


def is_rank(p: psutil.Process) -> bool:
    try:
        line = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return " -m pretrain.train " in line or str(SLOW_SAVE) in line


def ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(proc.pid).children(recursive=True) if is_rank(p)]
    except psutil.Error:
        return []


def job(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        return []


def send(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def wait_until(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.02)
    return False


def attempt_with_fault(cmd: list[str], run_dir: Path, fault: str, at_step: int, extra_env: dict) -> dict:
    """Starts the command, injects `fault` around step `at_step`; returns what the attempt gave."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(**extra_env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    note = ""
    if fault == "SIGTERM runner at start-up":
        wait_until(proc, lambda: len(ranks(proc)) == 2)
        time.sleep(1.5)  # the ranks are importing torch and DeepSpeed
        note = f"{logged_steps(run_dir)} steps logged when signalled"
        send([psutil.Process(proc.pid)], signal.SIGTERM)
    elif fault.endswith("during eval"):
        target = -(-at_step // EVAL_EVERY) * EVAL_EVERY  # the first eval at or after at_step

        def in_eval() -> bool:
            rs = records(run_dir)
            return any(r.get("step") == target and "loss" in r for r in rs) and not any(
                r.get("step") == target and "eval/loss" in r for r in rs)
        landed = wait_until(proc, in_eval)
        send(job(proc), signal.SIGTERM)
        note = f"eval of step {target} running: {landed}"
    elif fault.endswith("during save"):
        partial = run_dir / "checkpoints" / f"step{extra_env['SLOW_SAVE_STEP']}.partial"
        landed = wait_until(proc, partial.is_dir)
        send(job(proc), signal.SIGTERM)
        note = f"{partial.name} being written: {landed}"
    else:
        wait_until(proc, lambda: logged_steps(run_dir) >= at_step)
        if proc.poll() is None:
            victims = {"kill -9 rank": (lambda: ranks(proc)[-1:], signal.SIGKILL),
                       "SIGTERM rank": (lambda: ranks(proc)[:1], signal.SIGTERM),
                       "SIGUSR1 launcher": (lambda: job(proc)[:1], signal.SIGUSR1),
                       "kill -9 launcher": (lambda: job(proc)[:1], signal.SIGKILL),
                       "SIGTERM launch.run": (lambda: job(proc)[:1], signal.SIGTERM),
                       "SIGTERM job (W&B on)": (lambda: job(proc), signal.SIGTERM)}
            pick, sig = victims[fault]
            send(pick(), sig)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        left_at_exit = [p for p in psutil.process_iter() if _uses(p, run_dir)]
        # A killed launcher returns at once; its ranks notice within a second, save and exit.
        _, left = psutil.wait_procs(left_at_exit, timeout=120)
        for p in left:
            p.kill()
        if left:
            print(f"  {len(left)} processes left behind 120 s after {fault}", flush=True)
    return {"code": proc.returncode, "err": err, "left_at_exit": len(left_at_exit), "note": note}


def _uses(p: psutil.Process, run_dir: Path) -> bool:
    try:
        return f"run_dir={run_dir}" in " ".join(p.cmdline())
    except psutil.Error:
        return False


def finish(cmd: list[str], tries: int = 3, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """Re-runs `cmd` until it exits 0: (attempts, their output)."""
    err = ""
    for n in range(1, tries + 1):
        proc = subprocess.run([*cmd, *extra], cwd=REPO, env=env(), capture_output=True, text=True)
        err += proc.stdout + proc.stderr
        if proc.returncode == 0:
            return n, err
        why = [line for line in proc.stderr.splitlines() if line.startswith("error:") or "Error" in line][-1:]
        print(f"    re-run {n} exited {proc.returncode}: {why[0][:300] if why else '(no error line)'}", flush=True)
    raise RuntimeError(f"the run did not finish in {tries} re-runs: {' '.join(cmd)}\n{err[-3000:]}")


def outcome(run_dir: Path, steps: int) -> dict:
    losses = {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}
    samples = Counter()
    for path in (run_dir / "samples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            samples.update(tuple(s) for s in json.loads(line)["samples"])
    tensors = optimizer_tensors(run_dir / "checkpoints" / f"step{steps:08d}")
    return {"losses": losses, "samples": samples, "tensors": tensors}


def newest(run_dir: Path) -> str | None:
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step[0-9]*[0-9]"))
    return saved[-1] if saved else None


class Payload:
    """Unpickling it creates `marker`: what a planted checkpoint file could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(ckpt: Path, marker: Path) -> Path:
    path = ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"module": Payload(str(marker))}, path)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][path.name] = digest(path)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    return path


def damaged_copy(data_dir: Path, root: Path, fault: str, rng: random.Random, read: set[int]) -> tuple[Path, str]:
    """A copy of the shards with one damaged as `fault` says; returns it and what the error must name.
    The damage is put where the run reads (`read`: the window ids the reference run trained on): a shard
    the run never opens in its steps would not be checked, and rightly so."""
    copy = root / f"data-{fault.replace(' ', '_')}-{rng.randrange(10**6)}"
    shutil.copytree(data_dir, copy)
    manifest = Manifest.load(copy)
    infos = manifest.splits["train"]
    window = rng.choice(sorted(read))
    victim, first = 0, 0
    while first + infos[victim].samples <= window:
        first += infos[victim].samples
        victim += 1
    if fault == "swapped shard":
        source = (victim + 1) % len(infos)
        shutil.copyfile(copy / infos[source].name, copy / infos[victim].name)
        return copy, f"{copy / infos[victim].name}: "
    from data_pipeline.shards import read_blocks
    from tests.data_pipeline.test_stream import rewrite_block

    sizes = [len(b.tokens) for b in read_blocks(str(copy / infos[victim].name), np.dtype(manifest.dtype),
                                                manifest.seq_len)]
    block = next(k for k in range(len(sizes)) if first + sum(sizes[:k + 1]) > window)  # the block holding it

    def plant(tokens):
        tokens[0, 0] = manifest.vocab_size + 1
        return tokens

    key = rewrite_block(copy / infos[victim].name, block, plant)
    return copy, f"{copy / infos[victim].name}: sample {key} has token id {manifest.vocab_size + 1}"


def run_trial(fault: str, root: Path, data_dir: Path, steps: int, at_step: int, trial: int,
              rng: random.Random, read: set[int]) -> dict:
    run_dir = root / f"{fault.replace(' ', '_').replace('(', '').replace(')', '').replace('&', '')}-{trial}"
    info = {"fault": fault, "at_step": at_step}
    if fault in ("swapped shard", "out-of-vocabulary ids"):
        bad, named = damaged_copy(data_dir, root, fault, rng, read)
        cmd = command(run_dir, bad, steps, slow_step=steps)
        proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        clean = "Traceback" not in proc.stderr and "terminate called" not in proc.stderr
        info.update(code=proc.returncode, newest=newest(run_dir), named=any(named in e for e in errors) and clean,
                    note=f"{len(errors)} error line(s), {'no traceback' if clean else 'TRACEBACK'}")
        if fault == "swapped shard":
            shutil.rmtree(bad)
            shutil.copytree(data_dir, bad)  # the shard put back: same manifest, same data
            info["reruns"], _ = finish(cmd)
        else:
            info["reruns"], err = finish(cmd, extra=("data.on_corrupt=skip",))
            info["note"] += "; skip: " + next((x.split(": ", 2)[-1] for x in err.splitlines() if "skipped" in x), "?")
        return {**info, "run_dir": run_dir}
    if fault == "planted pickle":
        cmd = command(run_dir, data_dir, steps, slow_step=steps)
        first = command(run_dir, data_dir, at_step, slow_step=steps)
        subprocess.run(first, cwd=REPO, env=env(), capture_output=True, check=True)
        marker = root / f"pwned-{trial}"
        planted = plant_pickle(run_dir / "checkpoints" / newest(run_dir), marker)
        refused = f"{planted}: would unpickle io.open, which DeepSpeed's checkpoint files never hold"
        proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
        if proc.returncode == 0:  # an older checkpoint was there: resumed from it
            named = f"skipping checkpoint {planted.parent.name}: {refused}" in proc.stdout
            reruns, how = 1, "resumed from the one before"
        else:  # the only checkpoint: exit 2 naming it; removed, the run starts afresh
            named = proc.returncode == 2 and any(refused in line for line in proc.stderr.splitlines()
                                                 if line.startswith("error: no usable checkpoint"))
            shutil.rmtree(planted.parent)  # what the error line tells the user to do, with `latest`
            (planted.parent.parent / "latest").unlink(missing_ok=True)
            reruns, how = finish(cmd)[0] + 1, f"exit {proc.returncode} (the only checkpoint), removed and re-run"
        info.update(code=proc.returncode, newest=planted.parent.name, reruns=reruns,
                    named=named and not marker.exists(), note=f"{how}; refused by name: {named}; code run: "
                                                               f"{marker.exists()}")
        return {**info, "run_dir": run_dir}
    slow_step = at_step + 1
    extra_env = {}
    if fault.endswith("during save"):
        save_step = -(-at_step // 3) * 3
        extra_env = {"SLOW_SAVE_MATCH": f"step{save_step:08d}", "SLOW_SAVE_S": "4",
                     "SLOW_SAVE_STEP": f"{save_step:08d}"}
        slow_step = steps
    cmd = command(run_dir, data_dir, steps, slow_step=slow_step, fault=fault)
    got = attempt_with_fault(cmd, run_dir, fault, at_step, extra_env)
    clean = "Traceback" not in got["err"] and "terminate called" not in got["err"]
    info.update(code=got["code"], newest=newest(run_dir), note=got["note"], clean=clean,
                left_at_exit=got["left_at_exit"], wandb_warnings=got["err"].count("warning: W&B"))
    rerun_cmd = cmd if not fault.endswith("during save") else command(run_dir, data_dir, steps, slow_step=steps)
    info["reruns"], _ = finish(rerun_cmd)
    return {**info, "run_dir": run_dir}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=2, help="trials per kind of fault")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS), metavar="FAULT",
                        help=f"which faults to drill (default: all of {', '.join(FAULTS)})")
    parser.add_argument("--smoke", action="store_true", help="one trial of a planted pickle over 4 steps (the paths)")
    args = parser.parse_args()
    if args.smoke:  # deterministic: no signal races a process (tests/bench/test_smoke.py)
        args.trials, args.steps, args.faults = 1, 4, ["planted pickle"]
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="fault-drill-"))
    data_dir = root / "data"
    build(demo_data_config(data_dir), build_config())

    reference_dir = root / "reference"
    finish(command(reference_dir, data_dir, args.steps, slow_step=args.steps))
    reference = outcome(reference_dir, args.steps)

    rows, lines = [], []
    for fault in args.faults:
        row = {"fault": fault, "trials": 0, "survived": 0, "reruns": 0, "lost": 0, "repeated": 0,
               "weights_equal": 0, "max_loss_diff": 0.0, "as_expected": 0}
        for trial in range(args.trials):
            at_step = rng.randint(2, args.steps - (3 if "during" in fault else 2))  # an eval or save before the end
            t = run_trial(fault, root, data_dir, args.steps, at_step, trial, rng, {i for _, i in reference["samples"]})
            got = outcome(t["run_dir"], args.steps)
            row["trials"] += 1
            row["reruns"] += t["reruns"]
            row["survived"] += sorted(got["losses"]) == list(range(1, args.steps + 1))
            row["lost"] += sum((reference["samples"] - got["samples"]).values())
            row["repeated"] += sum((got["samples"] - reference["samples"]).values())
            row["weights_equal"] += len(got["tensors"]) == len(reference["tensors"]) and all(
                torch.equal(a, b) for a, b in zip(got["tensors"], reference["tensors"]))  # noqa: B905
            row["max_loss_diff"] = max(row["max_loss_diff"], max(
                abs(got["losses"].get(s, float("inf")) - loss) for s, loss in reference["losses"].items()))
            row["as_expected"] += expected(fault, t)
            lost = sum((reference["samples"] - got["samples"]).values())
            equal = len(got["tensors"]) == len(reference["tensors"]) and all(
                torch.equal(a, b) for a, b in zip(got["tensors"], reference["tensors"]))  # noqa: B905
            where = "start-up" if fault == "SIGTERM runner at start-up" else f"step {at_step}"
            line = (f"{fault} at {where}: exit {t['code']}, newest checkpoint {t['newest']}, "
                    f"finished after {t['reruns']} re-run(s), {lost} samples lost, weights "
                    f"{'equal' if equal else 'differ'}, as expected: {expected(fault, t)}")
            extras = [t["note"]] if t.get("note") else []
            if "left_at_exit" in t and fault == "SIGTERM launch.run":
                extras.append(f"{t['left_at_exit']} processes left when the command returned")
            if t.get("wandb_warnings"):
                extras.append(f"{t['wandb_warnings']} W&B warning")
            if "clean" in t and not t["clean"]:
                extras.append("TRACEBACK")
            lines.append(line + (f" ({'; '.join(extras)})" if extras else ""))
            print("  " + lines[-1], flush=True)
        rows.append(row)

    print("| fault | trials | as expected | survived | re-runs | samples lost | samples repeated | final weights equal "
          "| max loss diff |")
    print("|" + "---|" * 9)
    for r in rows:
        print(f"| {r['fault']} | {r['trials']} | {r['as_expected']} | {r['survived']} | {r['reruns']} | {r['lost']} | "
              f"{r['repeated']} | {r['weights_equal']}/{r['trials']} | {r['max_loss_diff']:.1e} |")
    print("\n".join(lines))
    print(json.dumps({"steps": args.steps, "samples_per_run": sum(reference["samples"].values()), "rows": rows}))


def expected(fault: str, t: dict) -> bool:
    """What each fault must end in, besides the re-run finishing (see the module's docstring)."""
    if fault in ("swapped shard", "out-of-vocabulary ids"):  # deepspeed's runner exits 1 when a rank fails
        return t["code"] != 0 and t["named"]  # (the rank's own 2 is what python -m launch.run returns)
    if fault == "planted pickle":
        return t["named"]
    if fault == "SIGTERM runner at start-up":
        return t["newest"] is None and "0 steps logged" in t["note"]
    if fault == "SIGTERM launch.run":
        return t["code"] == 75 and t["left_at_exit"] == 0 and t["clean"]
    if fault.endswith("during eval"):  # the eval abandoned, the step before it saved
        step = int(t["note"].split("eval of step ")[1].split(" ")[0])
        return t["newest"] == f"step{step:08d}" and t["clean"] and "False" not in t["note"]
    if fault.startswith("SIGTERM job"):
        return t["newest"] is not None and t["clean"] and "False" not in t.get("note", "")
    return True


if __name__ == "__main__":
    main()
