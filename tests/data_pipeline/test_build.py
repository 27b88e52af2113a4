import gzip
import hashlib
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.build import build, ensure_built
from data_pipeline.shards import DataError, Manifest, read_blocks
from data_pipeline.sources import DocumentReader, demo_documents, resolve_inputs
from data_pipeline.tokenizer import EOS, MASK, load_tokenizer
from tests.conftest import REPO, SEQ_LEN, build_config, child_env, data_config, demo_data_config

PY = [sys.executable, "-m"]


def test_demo_corpus_is_the_pydoc_topics_text():
    docs = demo_documents()
    assert len(docs) > 50 and 400_000 < sum(map(len, docs)) < 600_000


def test_shards_match_the_manifest(demo_shards):
    manifest = Manifest.load(demo_shards)
    tok = load_tokenizer(demo_shards / "tokenizer.json")
    assert manifest.seq_len == SEQ_LEN and manifest.vocab_size == 1024 and manifest.dtype == "<u2"
    assert (manifest.eos_id, manifest.mask_id) == (tok.token_to_id(EOS), tok.token_to_id(MASK))
    assert len(manifest.splits["train"]) > 5 and manifest.samples("heldout") > 0
    assert manifest.totals["train"]["samples"] == manifest.samples("train")
    assert manifest.documents["documents"] == len(demo_documents())
    for shards in manifest.splits.values():
        for info in shards:
            path = demo_shards / info.name
            assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
            blocks = list(read_blocks(str(path), np.dtype("<u2"), SEQ_LEN))
            assert sum(len(b.tokens) for b in blocks) == info.samples and info.tokens == info.samples * SEQ_LEN
            with tarfile.open(path) as tar:  # 16 windows of 64 uint16 per 2048-byte member
                assert {m.size for m in tar.getmembers() if m.name.endswith(".tokens")} <= {2048} | {
                    len(blocks[-1].tokens) * 128}


def test_document_starts_follow_eos(demo_shards):
    manifest = Manifest.load(demo_shards)
    for info in manifest.splits["train"][:3]:
        for block in read_blocks(str(demo_shards / info.name), np.dtype("<u2"), SEQ_LEN):
            flat = block.tokens.ravel()
            starts = block.starts[block.starts > 0]
            assert (flat[starts - 1] == manifest.eos_id).all()  # every document begins after an EOS
            eos = np.flatnonzero(flat[:-1] == manifest.eos_id) + 1
            assert set(eos.tolist()) <= set(block.starts.tolist())  # and every EOS is followed by one


def test_tokens_round_trip_to_the_corpus_text(demo_shards):
    manifest = Manifest.load(demo_shards)
    tok = load_tokenizer(demo_shards / "tokenizer.json")
    block = next(read_blocks(str(demo_shards / manifest.splits["train"][0].name), np.dtype("<u2"), SEQ_LEN))
    text = tok.decode(block.tokens.ravel().tolist(), skip_special_tokens=False)
    head = text.split(EOS)[0]  # a piece's first window starts a document
    assert len(head) > 1000 and any(doc.startswith(head) for doc in demo_documents())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The demo documents spread over every input format: 8 files."""
    root = tmp_path_factory.mktemp("corpus")
    docs = demo_documents()
    parts = [docs[i::8] for i in range(8)]
    (root / "a").mkdir()
    for i, doc in enumerate(parts[0]):
        (root / "a" / f"{i:03d}.txt").write_text(doc)
    lines = lambda part: "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(part))  # noqa: E731
    (root / "b.jsonl").write_text(lines(parts[1]))
    (root / "c.jsonl.gz").write_bytes(gzip.compress(lines(parts[2]).encode()))
    import zstandard

    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(parts[3]).encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    for j in (4, 5, 6, 7):
        pq.write_table(pa.table({"text": parts[j], "n": list(range(len(parts[j])))}), root / f"e{j}.parquet")
    return root


def test_every_input_format_is_read(corpus):
    files = resolve_inputs([str(corpus / "a"), str(corpus / "*.jsonl*"), str(corpus / "e*.parquet")])
    assert len(files) == len(list((corpus / "a").iterdir())) + 3 + 4
    texts = [doc for f in files for doc in DocumentReader(f, "text", "text", "p", "r", "replace")]
    assert sorted(texts) == sorted(demo_documents())


def test_missing_or_empty_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="'nothere/\\*.jsonl' matches no"):
        resolve_inputs(["nothere/*.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.* matches no"):
        resolve_inputs([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="data.inputs is empty"):
        resolve_inputs([])


def test_undecodable_text_is_replaced_or_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 broken"}\n{"text": "also fine"}\n')
    replaced = DocumentReader(str(path), "text", "text", "", "", "replace")
    assert list(replaced) == ["fine", "caf\ufffd broken", "also fine"] and replaced.counts.replaced == 1
    skipped = DocumentReader(str(path), "text", "text", "", "", "skip")
    assert list(skipped) == ["fine", "also fine"] and skipped.counts.skipped == 1


def test_malformed_records_name_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=f"{path}:2: not valid JSON"):
        list(DocumentReader(str(path), "text", "text", "", "", "replace"))
    path.write_text('{"body": "a"}\n')
    with pytest.raises(DataError, match=f"{path}:1: no field 'text'"):
        list(DocumentReader(str(path), "text", "text", "", "", "replace"))


def corpus_config(corpus, directory, **kw):
    return data_config(directory, [str(corpus)], member_bytes=1024, shard_bytes=8192, **kw)


@pytest.fixture(scope="module")
def corpus_shards(corpus, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("built") / "one-worker"
    build(corpus_config(corpus, directory), build_config(workers=1))
    return directory


def test_output_is_byte_identical_for_any_worker_count(corpus, corpus_shards, tmp_path):
    build(corpus_config(corpus, tmp_path / "two", tokenizer=str(corpus_shards / "tokenizer.json")),
          build_config(workers=2))
    one, two = Manifest.load(corpus_shards), Manifest.load(tmp_path / "two")
    assert one.fingerprint() == two.fingerprint()
    assert [s.sha256 for s in one.splits["train"]] == [s.sha256 for s in two.splits["train"]]
    assert one.documents["documents"] == len(demo_documents())


def test_interrupted_build_finishes_without_redoing_finished_inputs(corpus, corpus_shards, tmp_path):
    out = tmp_path / "resumed"
    overrides = ["data=files", f"data.inputs=[{corpus}]", f"data.dir={out}", f"trainer.seq_len={SEQ_LEN}",
                 f"data.tokenizer={corpus_shards / 'tokenizer.json'}", "data.member_bytes=1024",
                 "data.shard_bytes=8192",
                 "data.heldout_fraction=0.05", "build.workers=1", "build.progress=false"]
    proc = subprocess.Popen([*PY, "data_pipeline.build", *overrides], cwd=REPO, env=child_env(),
                            stderr=subprocess.PIPE)
    pieces = out / "pieces"

    def finished() -> list[dict]:
        return [json.loads(f.read_text()) for f in pieces.glob("0*.json") if "partial" not in f.name]

    def full_shards(fragments) -> list[str]:
        return [s["name"] for f in fragments for v in f["splits"].values() for s in v]

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(finished()) >= 3 and full_shards(finished()):
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # as a preempted job dies: no cleanup
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = finished()
    kept = {name: (out / name).stat().st_mtime_ns for name in full_shards(done)}
    assert len(done) >= 3 and kept
    rerun = subprocess.run([*PY, "data_pipeline.build", *overrides], cwd=REPO, env=child_env(), capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stderr.strip().splitlines()[-1])
    assert summary["skipped_done"] == len(done)
    renamed = {src: dst for pairs in json.loads((pieces / "merge.json").read_text())["renames"].values()
               for src, dst in pairs}
    assert {n: (out / renamed[n]).stat().st_mtime_ns for n in kept} == kept  # finished shards were not rewritten
    assert Manifest.load(out).fingerprint() == Manifest.load(corpus_shards).fingerprint()  # same bytes as one go


def test_rebuilding_a_directory_with_other_settings_is_refused_untouched(corpus, corpus_shards):
    before = (corpus_shards / "manifest.json").read_bytes()
    with pytest.raises(DataError, match="holds a build with data.seq_len=64, this build has data.seq_len=32"):
        build(corpus_config(corpus, corpus_shards, seq_len=32), build_config())
    assert (corpus_shards / "manifest.json").read_bytes() == before


def test_array_tasks_then_merge_give_the_single_build(corpus, corpus_shards, tmp_path):
    cfg = corpus_config(corpus, tmp_path / "array", tokenizer=str(corpus_shards / "tokenizer.json"))
    assert build(cfg, build_config(task=0, tasks=3, merge=False)) is None
    with pytest.raises(DataError, match="inputs are not built yet"):
        build(cfg, build_config(task=1, tasks=3, merge=True))  # task 2 has not run
    build(cfg, build_config(task=2, tasks=3, merge=False))
    manifest = build(cfg, build_config(task=0, tasks=3, merge=True))  # everything done: merge only
    assert manifest.fingerprint() == Manifest.load(corpus_shards).fingerprint()


def test_sft_build_records_prompt_lengths(tmp_path):
    path = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(300)]
    pairs.append({"prompt": "long " * 200, "response": "x"})  # longer than seq_len: left out, counted
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tok = tmp_path / "tok.json"
    subprocess.run([*PY, "data_pipeline.tokenizer", str(tok), "data=files", f"data.inputs=[{path}]", "data.format=sft",
                    "data.vocab_size=300"], cwd=REPO, env=child_env(), check=True)
    cfg = data_config(tmp_path / "sft", [str(path)], format="sft", tokenizer=str(tok), heldout_fraction=0.1)
    manifest = build(cfg, build_config())
    assert manifest.format == "sft" and manifest.documents["too_long"] == 1
    assert manifest.samples("train") + manifest.samples("heldout") == 300
    t = load_tokenizer(tok)
    block = next(read_blocks(str(tmp_path / "sft" / manifest.splits["train"][0].name), np.dtype("<u2"), SEQ_LEN))
    row, n_prompt = block.tokens[0], int(block.prompt[0])
    prompt_text = t.decode(row[:n_prompt].tolist())
    assert prompt_text.startswith("Question") and prompt_text.endswith("?")
    assert row[-1] == manifest.eos_id and 0 < manifest.max_prompt_len < SEQ_LEN
    # The stream hands each window's prompt length to the trainer.
    from data_pipeline.stream import TokenStream

    batch = next(iter(TokenStream(tmp_path / "sft", "train", 8, 0, 1, 0, 64)))
    for tokens, n in zip(batch["tokens"].long(), batch["prompt_len"], strict=True):
        assert t.decode(tokens[:n].tolist()).endswith("?") and not t.decode(tokens[n:].tolist()).strip().endswith("?")


def test_tokenizer_cli_and_special_tokens(corpus, tmp_path):
    out = tmp_path / "tok.json"
    proc = subprocess.run([*PY, "data_pipeline.tokenizer", str(out), "data=files", f"data.inputs=[{corpus}/b.jsonl]",
                           "data.vocab_size=500"], cwd=REPO, env=child_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() == 500 and tok.token_to_id(EOS) is not None and tok.token_to_id(MASK) is not None
    # A tokenizer without our special tokens gets them appended.
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "bare.json"))
    loaded = load_tokenizer(tmp_path / "bare.json")
    assert (loaded.token_to_id(EOS), loaded.token_to_id(MASK)) == (3, 4)


def test_validate_cli_finds_a_damaged_shard(corpus_shards, tmp_path):
    import shutil

    ok = subprocess.run([*PY, "data_pipeline.validate", str(corpus_shards)], cwd=REPO, env=child_env(),
                        capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout.splitlines()[-1])["ok"] is True
    copy = tmp_path / "copy"
    shutil.copytree(corpus_shards, copy)
    victim = Manifest.load(copy).splits["train"][2].name
    data = bytearray((copy / victim).read_bytes())
    data[700] ^= 0x01
    (copy / victim).write_bytes(bytes(data))
    bad = subprocess.run([*PY, "data_pipeline.validate", str(copy)], cwd=REPO, env=child_env(),
                         capture_output=True, text=True)
    assert bad.returncode == 1 and victim in bad.stdout
    assert "sha256" in bad.stdout and "fails its checksum" in bad.stdout


def test_shards_built_with_other_settings_are_refused(demo_shards):
    with pytest.raises(DataError, match=f"{demo_shards} was built with data.vocab_size=1024, this run has "
                                        "data.vocab_size=2048"):
        ensure_built(demo_data_config(demo_shards, vocab_size=2048))
    assert ensure_built(demo_data_config(demo_shards, shuffle_buffer=7)).seq_len == SEQ_LEN


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=f"no manifest.json in {tmp_path}"):
        Manifest.load(tmp_path)


def test_build_cli_reports_progress_in_plain_lines_when_redirected_and_bad_input(corpus, corpus_shards, tmp_path):
    args = [*PY, "data_pipeline.build", "data=files", f"data.inputs=[{corpus}/b.jsonl,{corpus}/c.jsonl.gz]",
            f"data.dir={tmp_path / 'p'}", f"data.tokenizer={corpus_shards / 'tokenizer.json'}",
            f"trainer.seq_len={SEQ_LEN}", "build.progress=true", "build.progress_every_s=0", "build.workers=1"]
    proc = subprocess.run(args, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr  # a log file gets lines, not a redrawn bar
    lines = [x for x in proc.stderr.splitlines() if x.startswith("build: ")]
    assert len(lines) > 2 and "tok/s" in lines[-1] and lines[-1].startswith("build: 2/2 inputs")
    missing = [a if not a.startswith("data.inputs=") else "data.inputs=[no/such/dir]" for a in args]
    proc = subprocess.run(missing, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: data.inputs: 'no/such/dir' matches no" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_cli_draws_a_progress_bar_on_a_terminal(corpus, corpus_shards, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    args = [*PY, "data_pipeline.build", "data=files", f"data.inputs=[{corpus}/b.jsonl]", f"data.dir={tmp_path / 'p'}",
            f"data.tokenizer={corpus_shards / 'tokenizer.json'}", f"trainer.seq_len={SEQ_LEN}", "build.progress=true"]
    proc = subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    text = seen.decode(errors="replace")
    assert "\r" in text and "tok/s" in text and "build (1 inputs)" in text and "build: " not in text


def test_demo_cache_of_an_older_format_is_rebuilt(tmp_path):
    old = tmp_path / "demo"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format_version": 1}))
    (old / "train-00000-0000.tar").write_bytes(b"old")
    manifest = ensure_built(demo_data_config(old))
    assert manifest.format_version == 2 and not (old / "train-00000-0000.tar").exists()
    # Anything but the demo cache is never rebuilt behind the user's back.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(DataError, match="format_version=1 is not 2; rebuild the shards"):
        ensure_built(data_config(tmp_path / "mine", ["corpus/"]))


def test_a_full_disk_during_the_build_is_one_line_and_the_rerun_finishes(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here: needs root")
    try:
        args = [*PY, "data_pipeline.build", "data=demo", f"data.dir={mount / 'demo'}", f"trainer.seq_len={SEQ_LEN}",
                "data.vocab_size=1024"]
        proc = subprocess.run(args, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: the build of {mount / 'demo'} stopped: No space left on device (0.0 MiB free "
                          f"there); run it again once that is fixed: it continues where it stopped"]
        subprocess.run(["mount", "-o", "remount,size=8m", str(mount)], check=True)
        subprocess.run(args, cwd=REPO, env=child_env(), capture_output=True, timeout=120, check=True)
        assert Manifest.load(mount / "demo").samples("train") > 0
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
