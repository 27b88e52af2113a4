"""launch/slurm/build_shards.sh on a real (one-node, loopback) SLURM cluster started by the test."""

import json
import subprocess
import sys

from data_pipeline.build import build
from data_pipeline.shards import Manifest
from data_pipeline.sources import demo_documents
from tests.conftest import REPO, SEQ_LEN, build_config, child_env, data_config
from tests.launch.slurm_cluster import slurm_available, slurm_cluster, wait_for_jobs


def test_array_build_and_merge_on_slurm_equal_a_local_build(tmp_path, demo_shards):
    assert slurm_available(), "slurmctld/slurmd/sbatch not found: `make test` installs Debian's slurm-wlm"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = demo_documents()
    for i in range(6):
        (corpus / f"part{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[i::6]))
    tokenizer = demo_shards / "tokenizer.json"
    local = build(data_config(tmp_path / "local", [str(corpus)], tokenizer=str(tokenizer)), build_config())

    out = tmp_path / "slurm-built"
    overrides = ["data=files", f"data.inputs=[{corpus}]", f"data.dir={out}", f"data.tokenizer={tokenizer}",
                 f"trainer.seq_len={SEQ_LEN}", "data.shard_bytes=16384", "data.member_bytes=2048",
                 "data.heldout_fraction=0.05"]
    with slurm_cluster(tmp_path / "slurm") as env:
        env = {**env, **child_env(), "PYTHON": sys.executable, "CPUS_PER_TASK": "1"}
        submit = subprocess.run([str(REPO / "launch/slurm/build_shards.sh"), "3", *overrides], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        assert submit.returncode == 0, submit.stderr
        _, array_id, _, merge_id = submit.stdout.split()
        wait_for_jobs(env, [array_id, merge_id], timeout=600)
        logs = {p.name: p.read_text() for p in tmp_path.glob("build-shards-*.out")}
    assert len(logs) == 4, logs  # three array tasks and the merge
    fragments = [json.loads(p.read_text()) for p in (out / "pieces").glob("[0-9]*.json")]
    assert sorted(f["index"] for f in fragments) == list(range(6))
    assert (out / "manifest.json").is_file(), logs
    merged = Manifest.load(out)
    assert merged.fingerprint() == local.fingerprint()
    assert merged.totals == local.totals
    check = subprocess.run([sys.executable, "-m", "data_pipeline.validate", str(out)], cwd=REPO, env=child_env(),
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
