"""Every bench's `--smoke` mode, so that a benchmark cannot rot unseen (BENCHMARKS.md's commands are
what users run): each runs in seconds on tiny shapes, in a copy of the repository, and must end with
its JSON line holding the figures its table compares. The figures themselves are not checked: smoke
shapes measure nothing, and timings never go in tests."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_docs import docs_env, tracked_copy

BENCHES = sorted(p.stem for p in (REPO / "bench").glob("*.py") if '__name__ == "__main__"' in p.read_text())
# The JSON key of each bench's side-by-side comparison (a ratio, or what the ratio is made of).
COMPARED = {"block": "nelbo", "data": "build_ratio", "demo_quality": "gap", "engine": "step_time_over_ours",
            "expert_parallel": "over_pure_torch", "export_memory": "ratio_deepspeed_over_ours", "fault_drill": "rows",
            "gpu": "cases", "model": "ratio",
            "moe": "ratio_moe_over_dense", "precision": "heldout", "sampling": "rows",
            "sequence_parallel": "sp2_over_sp1", "variance": "variance_ratio",
            "warm_start": "curves"}


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    return tracked_copy(tmp_path_factory.mktemp("bench"))


def test_every_bench_is_listed():
    assert set(BENCHES) == set(COMPARED), "a new bench: add its compared key to COMPARED"


@pytest.mark.parametrize("bench", BENCHES)
def test_the_bench_runs_in_its_smoke_mode(bench, repo_copy):
    proc = subprocess.run([sys.executable, f"bench/{bench}.py", "--smoke"], cwd=repo_copy, env=docs_env(repo_copy),
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    value = result[COMPARED[bench]]
    assert value not in (None, [], {}), result
    if isinstance(value, float):
        assert math.isfinite(value), result
    if bench == "gpu":  # its cases report their own failures instead of exiting non-zero
        assert all("error" not in r and r["tokens_per_s"] > 0 for r in value.values()), value
    if bench == "fault_drill":
        assert all(r["as_expected"] == r["trials"] for r in value), value
    if bench == "sampling":  # the block model's exact cache agrees with no cache on every token
        rows = {r["setting"]: r for r in result["block_rows"]}
        assert rows["block cache (exact)"]["agreement"] == 1.0 and rows["threshold 0.5 + block cache"]["agreement"] \
            == rows["threshold 0.5"]["agreement"], result["block_rows"]
