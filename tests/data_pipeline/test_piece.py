import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipeline.build import build
from data_pipeline.pack import Packer
from data_pipeline.piece import pad_vocab
from data_pipeline.shards import Manifest
from data_pipeline.sources import demo_documents
from tests.conftest import REPO, SEQ_LEN, build_config, child_env, data_config


def test_packer_appends_eos_cuts_windows_and_keeps_document_starts():
    p = Packer(seq_len=4, eos_id=0)
    for doc in ([1, 2, 3], [4, 5], [6, 7, 8, 9]):
        p.add_document(doc)
    assert p.full_windows() == 3
    block = p.take(3, "k", np.dtype("<u2"))
    assert block.tokens.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert block.starts.tolist() == [0, 4, 7]  # where each document begins in the flattened windows
    assert p.full_windows() == 0


def test_packer_state_round_trips():
    p = Packer(seq_len=4, eos_id=0)
    for doc in ([1, 2, 3], [4, 5], [6]):
        p.add_document(doc)
    p.take(1, "k", np.dtype("<u2"))
    q = Packer(seq_len=4, eos_id=0)
    q.restore(p.state())
    q.add_document([7, 8])
    p.add_document([7, 8])
    assert q.take(2, "k", np.dtype("<u2")).tokens.tolist() == p.take(2, "k", np.dtype("<u2")).tokens.tolist()


def test_sft_pairs_are_padded_with_eos_and_too_long_pairs_refused():
    p = Packer(seq_len=6, eos_id=0)
    assert p.add_pair([1, 2], [3])
    assert not p.add_pair([1, 2, 3], [4, 5, 6])  # 3 + 3 + EOS > 6
    block = p.take(1, "k", np.dtype("<u2"))
    assert block.tokens.tolist() == [[1, 2, 3, 0, 0, 0]] and block.prompt.tolist() == [2]


def test_vocab_is_padded_to_a_multiple_of_128():
    assert [pad_vocab(n) for n in (1, 128, 129, 4096, 50257)] == [128, 128, 256, 4096, 50304]


@pytest.fixture(scope="module")
def big_file(tmp_path_factory, demo_shards):
    """One input of ~1.9M tokens (the demo corpus 12 times), its clean build, and the build command."""
    root = tmp_path_factory.mktemp("piece")
    corpus = root / "big.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for _ in range(12) for d in demo_documents()))
    tok = demo_shards / "tokenizer.json"
    clean = build(data_config(root / "clean", [str(corpus)], member_bytes=1024, shard_bytes=8192, tokenizer=str(tok)),
                  build_config())
    args = [sys.executable, "-m", "data_pipeline.build", "data=files", f"data.inputs=[{corpus}]",
            f"data.tokenizer={tok}", f"trainer.seq_len={SEQ_LEN}", "data.member_bytes=1024", "data.shard_bytes=8192",
            "data.heldout_fraction=0.05", "build.workers=1", "build.progress=false"]
    return clean, args


def build_and_kill(args: list[str], out) -> dict:
    """Starts the build, SIGKILLs it once 150 train shards are recorded; returns the recorded state."""
    proc = subprocess.Popen([*args, f"data.dir={out}"], cwd=REPO, env=child_env(), stderr=subprocess.DEVNULL)
    partial = out / "pieces" / "00000.partial.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(partial.read_text())["writers"]["train"]["shards"]) >= 150:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a preempted job: no cleanup
    proc.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    return json.loads(partial.read_text())


def rerun(args: list[str], out) -> Manifest:
    proc = subprocess.run([*args, f"data.dir={out}"], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return Manifest.load(out)


def test_a_killed_build_of_one_file_resumes_after_its_last_finished_shard(tmp_path, big_file):
    clean, args = big_file
    out = tmp_path / "killed"
    partial = out / "pieces" / "00000.partial.json"
    state = build_and_kill(args, out)
    kept = {s["name"]: (out / s["name"]).stat().st_mtime_ns for w in state["writers"].values() for s in w["shards"]}
    assert len(kept) >= 150 and state["records"] > 0

    resumed = rerun(args, out)
    renamed = {src: dst for pairs in json.loads((out / "pieces" / "merge.json").read_text())["renames"].values()
               for src, dst in pairs}
    assert {name: (out / renamed[name]).stat().st_mtime_ns for name in kept} == kept  # finished shards not rewritten
    assert resumed.fingerprint() == clean.fingerprint()  # the same bytes as an uninterrupted build
    assert resumed.documents == clean.documents and not partial.exists()


def test_a_resume_point_whose_files_are_gone_redoes_the_input(tmp_path, big_file):
    # E.g. killed after a shard was renamed into place but before the state recorded it.
    clean, args = big_file
    out = tmp_path / "killed"
    build_and_kill(args, out)
    for tmp in out.glob("*.tar.tmp"):
        tmp.unlink()
    assert rerun(args, out).fingerprint() == clean.fingerprint()
