"""Peak memory of exporting a ZeRO-3 checkpoint: ours vs DeepSpeed's zero_to_fp32, side by side.

    .venv/bin/python bench/export_memory.py [--model small] [--ranks 2] [--max-shard-size 100MB] [--smoke]

Trains `--model` for one step with `--ranks` ZeRO-3 CPU processes (the real entry point, seq 64) to get
a real checkpoint, then runs, each in its own process, on the same checkpoint:
- floor:    a process that only imports what both need
- ours:     python -m pretrain.export RUN OUT --dtype fp32 --max-shard-size S, and with one file
- baseline: deepspeed.utils.zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict(CKPT, OUT,
            max_shard_size=S, safe_serialization=True) (DeepSpeed's consolidation, also mmap-based)
and polls each process's /proc/PID/status every 20 ms: peak RssAnon (memory the process owns) and
peak VmHWM (resident, including file pages mapped from the checkpoint, which the kernel can drop).
Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import build_config, child_env, demo_data_config, free_port  # noqa: E402

IMPORTS = "import pretrain.export, deepspeed.utils.zero_to_fp32, safetensors.torch"
BASELINE = """
import sys
from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
convert_zero_checkpoint_to_fp32_state_dict(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3],
                                           safe_serialization=True, tag=sys.argv[4])
"""


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def measure(cmd: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    anon = hwm = 0
    while proc.poll() is None:
        try:
            anon, hwm = max(anon, status_kb(proc.pid, "RssAnon")), max(hwm, status_kb(proc.pid, "VmHWM"))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"anon_mb": anon / 1024, "hwm_mb": hwm / 1024, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="small")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-shard-size", default="100MB")
    parser.add_argument("--smoke", action="store_true", help="seconds: model=tiny on 1 rank (the paths, not figures)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.ranks, args.max_shard_size = "tiny", 1, "1MB"
    from data_pipeline.build import build

    work = Path(tempfile.mkdtemp(prefix="export-bench-"))
    try:
        data = work / "data"
        build(demo_data_config(data, vocab_size=1024), build_config())
        run = work / "run"
        train = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(args.ranks),
                 "--master_port", str(free_port()), "-m", "pretrain.train", f"model={args.model}",
                 "model.vocab_size=1024",
                 "data.vocab_size=1024",
                 "trainer.seq_len=64", "trainer.micro_batch_size=1", f"trainer.global_batch_size={args.ranks}",
                 "trainer.max_steps=1", "logging.mode=disabled", f"data.dir={data}", f"run_dir={run}",
                 "optim.schedule.unit=steps", "optim.schedule.points=[[0,1.0]]"]
        subprocess.run(train, cwd=ROOT, env=child_env(), check=True, capture_output=True, timeout=1800)
        ckpt = run / "checkpoints" / "step00000001"
        params = json.loads((run / "setup.json").read_text())["params"]
        checkpoint_mb = sum(f.stat().st_size for f in ckpt.iterdir()) / 2**20
        rows = {
            "imports only (the floor)": measure([sys.executable, "-c", IMPORTS]),
            f"ours, files <= {args.max_shard_size}": measure(
                [sys.executable, "-m", "pretrain.export", str(run), str(work / "ours"), "--dtype", "fp32",
                 "--max-shard-size", args.max_shard_size]),
            "ours, one file (whole model)": measure(
                [sys.executable, "-m", "pretrain.export", str(run), str(work / "ours1"), "--dtype", "fp32",
                 "--max-shard-size", "100GB"]),
            f"DeepSpeed zero_to_fp32, files <= {args.max_shard_size}": measure(
                [sys.executable, "-c", BASELINE, str(run / "checkpoints"), str(work / "theirs"), args.max_shard_size,
                 "step00000001"]),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model_mb = params * 4 / 2**20
    print(f"model={args.model}: {params:,} parameters ({model_mb:,.0f} MB in fp32), checkpoint "
          f"{checkpoint_mb:,.0f} MB on disk ({args.ranks} ranks)")
    print("| process | peak RssAnon MB | peak VmHWM MB | seconds |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['anon_mb']:,.0f} | {r['hwm_mb']:,.0f} | {r['seconds']:.1f} |")
    floor, ours, theirs = (r["anon_mb"] for r in list(rows.values())[:2] + list(rows.values())[3:])
    print(json.dumps({"model": args.model, "params": params, "model_fp32_mb": round(model_mb),
                      **{k: {m: round(v, 1) for m, v in r.items()} for k, r in rows.items()},
                      "anon_above_floor_ours_mb": round(ours - floor),
                      "anon_above_floor_deepspeed_mb": round(theirs - floor),
                      "ratio_deepspeed_over_ours": round((theirs - floor) / max(ours - floor, 1), 2)}))

if __name__ == "__main__":
    main()
