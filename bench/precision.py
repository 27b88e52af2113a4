"""bf16 against fp32 on the CPU: the demo's loss curve and resident memory, side by side in one run.

    .venv/bin/python bench/precision.py [--steps 300] [--window 50] [--precisions fp32,bf16] [--smoke] [-- OVERRIDES]

Trains the demo (`make demo`'s preset, conf/experiment/demo.yaml, same seed) once per precision with
the real entry point, one after the other, and reads each run's metrics.jsonl. Prints per window of
steps: the mean training loss of each precision and their difference, and each run's `mem/rss_gb` at
the window's end; then the held-out loss of each. The last line is one JSON object. bf16 is native
only where lscpu lists avx512_bf16 or amx_bf16 (elsewhere oneDNN emulates it, ~8x slower): the host's
flags are printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `make demo`'s preset, less the sample; the precision and the step count come from the command line.
DEMO = ["experiment=demo", "sample.at_end=false", "logging.mode=disabled", "trainer.log_every=10"]


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return ",".join(f for f in ("avx512_bf16", "amx_bf16", "avx2") if f in flags) or "none of avx2/avx512_bf16/amx"


def train(precision: str, steps: int, run_dir: Path, extra: list[str]) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "pretrain.train", *DEMO, f"trainer.max_steps={steps}",
           f"trainer.eval_every={steps}", f"trainer.precision={precision}", f"run_dir={run_dir}", *extra]
    start = time.monotonic()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, seconds


def windows(rows: list[dict], window: int, steps: int) -> dict[int, tuple[float, float | None]]:
    """Window end step -> (mean training loss, rss at the last logged step of the window)."""
    out = {}
    for end in range(window, steps + 1, window):
        inside = [r for r in rows if "loss" in r and end - window < r["step"] <= end]
        if inside:
            out[end] = (sum(r["loss"] for r in inside) / len(inside), inside[-1].get("mem/rss_gb"))
    return out


def heldout(rows: list[dict]) -> float | None:
    evals = [r for r in rows if any(k.startswith("eval") for k in r)]
    if not evals:
        return None
    last = evals[-1]
    return next((v for k, v in last.items() if k.startswith("eval") and k.endswith("loss")), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--smoke", action="store_true", help="seconds: 4 steps each (the paths, not the figures)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for both runs (after --)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.window = 4, 2
    precisions = args.precisions.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in precisions:
            rows, seconds = train(p, args.steps, Path(tmp) / p, args.overrides)
            results[p] = (windows(rows, args.window, args.steps), heldout(rows), seconds)

    print(f"cpu flags: {cpu_flags()}; demo, {args.steps} steps")
    head = "steps".rjust(9) + "".join(f"{'loss ' + p:>12}" for p in precisions)
    head += "  diff" if len(precisions) == 2 else ""
    head += "".join(f"{'rss GB ' + p:>14}" for p in precisions)
    print(head)
    diffs = []
    for end in results[precisions[0]][0]:
        cells = [results[p][0].get(end, (float("nan"), None)) for p in precisions]
        line = f"{end - args.window + 1:>4}-{end:<4}" + "".join(f"{loss:12.3f}" for loss, _ in cells)
        if len(precisions) == 2:
            diffs.append(cells[1][0] - cells[0][0])
            line += f"{diffs[-1]:+6.3f}"
        line += "".join(f"{rss:14.2f}" if rss is not None else f"{'-':>14}" for _, rss in cells)
        print(line)
    print("held-out loss: " + ", ".join(f"{p} {results[p][1]}" for p in precisions)
          + "; wall: " + ", ".join(f"{p} {results[p][2]:.0f}s" for p in precisions))
    summary = {"steps": args.steps, "cpu_flags": cpu_flags(),
               "heldout": {p: results[p][1] for p in precisions},
               "seconds": {p: round(results[p][2], 1) for p in precisions},
               "rss_gb": {p: {end: rss for end, (_, rss) in results[p][0].items()} for p in precisions}}
    if diffs:
        summary["max_abs_window_diff"] = round(max(abs(d) for d in diffs), 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
