"""The merge: the rests of all inputs packed together, numbered shards, a held-out split that is never
empty, and a finished directory that stays finished."""

import json
import math
import os

import pytest

from data_pipeline.build import build
from data_pipeline.shards import DataError
from data_pipeline.sources import demo_documents
from data_pipeline.validate import validate
from tests.conftest import SEQ_LEN, build_config, data_config


@pytest.fixture(scope="module")
def small_files(tmp_path_factory, demo_shards):
    """A small analogue of 664 small .txt files at seq_len 4096: 240 files of 100-1,400 characters
    (about 30-400 tokens each) at seq_len 64, most of them shorter than a shard."""
    root = tmp_path_factory.mktemp("small")
    text = "".join(demo_documents())
    pos = 0
    for i in range(240):
        size = 100 + (i * 389) % 1300
        (root / f"{i:03d}.txt").write_text(text[pos: pos + size])
        pos += size
    return root, str(demo_shards / "tokenizer.json")


def small_config(small_files, directory, **kw):
    root, tok = small_files
    return data_config(directory, [str(root)], tokenizer=tok, **{"member_bytes": 1024, "shard_bytes": 8192, **kw})


@pytest.fixture(scope="module")
def small_build(small_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "small"
    return out, build(small_config(small_files, out), build_config())


def test_many_small_files_keep_all_but_the_last_partial_window(small_build):
    out, manifest = small_build
    kept = sum(v["tokens"] for v in manifest.totals.values())
    assert manifest.input_tokens == kept + sum(manifest.dropped_tokens.values())  # every token is somewhere
    assert all(0 <= n < SEQ_LEN for n in manifest.dropped_tokens.values())  # at most one partial window per split
    assert manifest.documents["documents"] == 240 and manifest.samples("heldout") > 0


def test_shards_are_numbered_without_gaps_and_filled(small_build):
    out, manifest = small_build
    for split, shards in manifest.splits.items():
        assert [s.name for s in shards] == [f"{split}-{n:06d}.tar" for n in range(len(shards))]
        window_bytes = SEQ_LEN * 2
        assert len(shards) <= math.ceil(manifest.samples(split) * window_bytes / 8192) + 1  # ~ size / shard_bytes
    on_disk = sorted(p.name for p in out.glob("*.tar*"))
    assert on_disk == sorted(s.name for v in manifest.splits.values() for s in v)  # nothing else left behind
    assert not list((out / "pieces").glob("*.rest.npz"))
    assert validate(out)[1] == []


def test_the_same_bytes_for_any_worker_or_task_count(small_files, small_build, tmp_path):
    _, one = small_build
    two = build(small_config(small_files, tmp_path / "two"), build_config(workers=2))
    cfg = small_config(small_files, tmp_path / "array")
    for task in range(3):
        build(cfg, build_config(task=task, tasks=3, merge=False))
    array = build(cfg, build_config(task=1, tasks=3, merge=True))
    assert one.fingerprint() == two.fingerprint() == array.fingerprint()
    assert one.totals == two.totals == array.totals and one.dropped_tokens == array.dropped_tokens


def test_a_merged_directory_is_finished(small_files, small_build):
    out, manifest = small_build
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = build(small_config(small_files, out), build_config(workers=2))
    assert again.fingerprint() == manifest.fingerprint()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before  # nothing rebuilt
    root, _ = small_files
    victim = root / "007.txt"
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=f"its input {victim} changed since"):
        build(small_config(small_files, out), build_config())


def test_a_tiny_held_out_share_still_gets_a_window(small_files, tmp_path, capfd):
    manifest = build(small_config(small_files, tmp_path / "t", heldout_fraction=1e-12), build_config())
    assert manifest.samples("heldout") == 1
    err = capfd.readouterr().err
    assert "warning: the held-out documents (0 tokens, data.heldout_fraction=1e-12) do not fill one window" in err
    # and at build time, not at the first evaluation: so few windows give no standard error
    assert f"warning: the held-out split has 1 window(s) of {SEQ_LEN} tokens (data.heldout_fraction=1e-12)" in err
    kept = sum(v["tokens"] for v in manifest.totals.values())
    assert manifest.input_tokens == kept + sum(manifest.dropped_tokens.values())  # moved, not copied


def test_held_out_window_when_every_train_window_is_in_a_full_shard(tmp_path, demo_shards):
    # format=sft: one window per pair; 32 pairs fill exactly two shards of 16 windows, so no rest is left
    # to take the held-out window from: the last shard goes back into the rests.
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(32)))
    cfg = data_config(tmp_path / "sft", [str(path)], format="sft", tokenizer=str(demo_shards / "tokenizer.json"),
                      member_bytes=1024, shard_bytes=2048, heldout_fraction=1e-12)
    manifest = build(cfg, build_config())
    assert (manifest.samples("train"), manifest.samples("heldout")) == (31, 1)
    assert [s.samples for s in manifest.splits["train"]] == [16, 15]
    assert validate(tmp_path / "sft")[1] == []
    assert sorted(p.name for p in (tmp_path / "sft").glob("*.tar")) == ["heldout-000000.tar", "train-000000.tar",
                                                                        "train-000001.tar"]


def test_an_interrupted_merge_is_finished_by_running_the_build_again(small_files, tmp_path, monkeypatch):
    import data_pipeline.merge

    def killed(*args, **kwargs):
        raise DataError("killed after the renames")

    # shards of one member: many inputs fill a few, so the merge renames some and packs the rests
    clean = build(small_config(small_files, tmp_path / "clean", shard_bytes=1024), build_config())
    cfg = small_config(small_files, tmp_path / "m", shard_bytes=1024)
    with monkeypatch.context() as m:
        m.setattr(data_pipeline.merge, "_pack_rests", killed)
        with pytest.raises(DataError, match="killed after the renames"):
            build(cfg, build_config())
    assert (tmp_path / "m" / "train-000000.tar").is_file() and not (tmp_path / "m" / "manifest.json").exists()
    assert build(cfg, build_config()).fingerprint() == clean.fingerprint()
