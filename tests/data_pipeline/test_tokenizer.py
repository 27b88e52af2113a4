"""Long documents are tokenized a segment at a time, to the same tokens as in one piece."""

import json
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.build import build
from data_pipeline.shards import Manifest, read_blocks
from data_pipeline.sources import demo_documents
from data_pipeline.tokenizer import SEGMENT_CHARS, load_tokenizer, segments
from tests.conftest import REPO, SEQ_LEN, build_config, child_env, data_config

MIXED = "".join(demo_documents()) + " tabs\tand  double  spaces,\n\n\nnewlines  \t x  ünïcödé 日本語 1 234 "


@pytest.mark.parametrize("size", [400, 1000, 20_000])  # the text has runs of up to 381 characters without a cut
def test_segments_cut_at_spaces_and_give_the_tokens_of_the_whole(demo_shards, size):
    text = MIXED[:200_000]
    parts = list(segments(text, size))
    assert "".join(parts) == text and len(parts) >= len(text) // size
    assert all(len(p) <= size for p in parts)
    assert all(p.startswith(" ") and not p[1].isspace() for p in parts[1:])
    tok = load_tokenizer(demo_shards / "tokenizer.json")
    whole = tok.encode(text, add_special_tokens=False).ids
    joined = [i for p in parts for i in tok.encode(p, add_special_tokens=False).ids]
    assert joined == whole


def test_a_run_without_spaces_is_cut_at_the_limit():
    assert list(segments("x" * 25, 10)) == ["x" * 10, "x" * 10, "x" * 5]


def test_a_long_document_is_built_to_the_tokens_of_the_whole(demo_shards, tmp_path):
    text = (MIXED * (2 * SEGMENT_CHARS // len(MIXED) + 1))[: 2 * SEGMENT_CHARS + 1000]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "long.txt").write_text(text)
    tok = demo_shards / "tokenizer.json"
    manifest = build(data_config(tmp_path / "out", [str(tmp_path / "in")], tokenizer=str(tok), heldout_fraction=0),
                     build_config())
    windows = np.concatenate([b.tokens.ravel() for s in manifest.splits["train"]
                              for b in read_blocks(str(tmp_path / "out" / s.name), np.dtype("<u2"), SEQ_LEN)])
    whole = load_tokenizer(tok).encode(text, add_special_tokens=False).ids + [manifest.eos_id]
    assert len(windows) == len(whole) // SEQ_LEN * SEQ_LEN and windows.tolist() == whole[: len(windows)]


PEAK = """
import resource, sys
sys.path.insert(0, {repo!r})
from data_pipeline.build import build
from tests.conftest import build_config, data_config
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
build(data_config({out!r}, [{inp!r}], tokenizer={tok!r}), build_config())
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_one_huge_document_is_built_in_bounded_memory(demo_shards, tmp_path, kind):
    size = 2_000_000  # one document of 2 MB: tokenized whole it took ~350 MB more (10 GB for 50 MB)
    text = (MIXED * (size // len(MIXED) + 1))[:size]
    path = tmp_path / f"huge.{kind}"
    path.write_text(text if kind == "txt" else json.dumps({"text": text}) + "\n")
    tok = str(demo_shards / "tokenizer.json")
    code = PEAK.format(repo=str(REPO), out=str(tmp_path / "out"), inp=str(path), tok=tok)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    growth = int(proc.stdout.split()[-1])
    assert growth < 40 * size, f"peak memory grew by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB document"
    assert Manifest.load(tmp_path / "out").documents["documents"] == 1
