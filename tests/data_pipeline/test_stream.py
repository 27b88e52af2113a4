import itertools
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.build import build
from data_pipeline.shards import CorruptShardError, DataError, Manifest, read_blocks
from data_pipeline.stream import DataStateError, TokenStream, make_loader
from tests.conftest import REPO, build_config, child_env, demo_data_config


def stream(directory, rank=0, world=2, workers=0, seed=0, batch=4, split="train", **kw):
    return TokenStream(directory, split, micro_batch_size=batch, rank=rank, world_size=world, seed=seed,
                       shuffle_buffer=32, num_workers=workers, **kw)


def take(s, n):
    return list(itertools.islice(make_loader(s), n))


def ids_by_epoch(batches) -> Counter:
    return Counter((int(e), int(i)) for b in batches for e, i in zip(b["epoch"], b["ids"], strict=True))


def epoch_ids(counter: Counter, epoch: int) -> Counter:
    return Counter({i: n for (e, i), n in counter.items() if e == epoch})


def test_batches_are_windows_in_the_shards_dtype(demo_shards):
    batch = take(stream(demo_shards), 1)[0]
    assert batch["tokens"].dtype == torch.uint16 and batch["tokens"].shape == (4, 64)
    assert batch["ids"].shape == (4,) and batch["epoch"].tolist() == [0, 0, 0, 0]
    assert "prompt_len" not in batch and int(batch["tokens"].long().max()) < 1024


def all_windows(directory) -> np.ndarray:
    """Every training window, in manifest order (window id = row), read straight from the tars."""
    manifest = Manifest.load(directory)
    rows = []
    for info in manifest.splits["train"]:
        with tarfile.open(directory / info.name) as tar:
            names = sorted(m.name for m in tar.getmembers() if m.name.endswith(".tokens"))
            rows += [np.frombuffer(tar.extractfile(n).read(), "<u2").reshape(-1, 64) for n in names]
    return np.concatenate(rows)


def test_window_ids_name_the_windows(demo_shards):
    windows = all_windows(demo_shards)
    for b in take(stream(demo_shards, workers=2), 50):
        assert np.array_equal(b["tokens"].numpy(), windows[b["ids"].numpy()])


@pytest.mark.parametrize("world,workers", [(2, 2), (1, 3)])
def test_readers_split_each_epoch_exactly(demo_shards, world, workers):
    n = Manifest.load(demo_shards).samples("train")
    per_rank = 2 * n // (world * 4) + 8  # enough batches to finish epoch 0 on every reader
    seen = Counter()
    for rank in range(world):
        seen += ids_by_epoch(take(stream(demo_shards, rank=rank, world=world, workers=workers), per_rank))
    epoch0 = epoch_ids(seen, 0)
    assert sorted(epoch0) == list(range(n)) and set(epoch0.values()) == {1}  # each window once


def test_stream_runs_over_epochs_and_reshuffles(demo_shards):
    s = stream(demo_shards, world=1, batch=1)
    n = s.manifest.samples("train")
    batches = take(s, 2 * n + 10)
    order0 = [int(b["ids"][0]) for b in batches if int(b["epoch"][0]) == 0]
    order1 = [int(b["ids"][0]) for b in batches if int(b["epoch"][0]) == 1]
    assert sorted(order0) == sorted(order1) == list(range(n))
    assert order0 != order1


def test_seed_changes_the_order(demo_shards):
    a, b = take(stream(demo_shards, seed=0), 3), take(stream(demo_shards, seed=1), 3)
    assert [x["ids"].tolist() for x in a] != [x["ids"].tolist() for x in b]


@pytest.mark.parametrize("start", [7, 150])
@pytest.mark.parametrize("per_item", [1, 3])
def test_resume_yields_exactly_the_uninterrupted_batches(demo_shards, start, per_item):
    for rank in (0, 1):  # 2 ranks x 2 workers
        full = take(stream(demo_shards, rank=rank, workers=2, batches_per_item=per_item), start + 10)
        resumed = stream(demo_shards, rank=rank, workers=2, batches_per_item=per_item)
        resumed.load_state_dict(stream(demo_shards, rank=rank, workers=2, batches_per_item=per_item).state_dict(start))
        for expected, got in zip(full[start:], take(resumed, 10), strict=True):
            assert torch.equal(expected["tokens"], got["tokens"]) and torch.equal(expected["ids"], got["ids"])


def test_items_of_several_batches_hold_the_same_windows(demo_shards):
    # Grouping micro-batches into larger transfers changes which reader reads what, never coverage.
    n = Manifest.load(demo_shards).samples("train")
    batches = take(stream(demo_shards, world=1, workers=2, batches_per_item=5), 2 * n // 4)
    assert all(b["tokens"].shape == (4, 64) for b in batches)
    epoch0 = epoch_ids(ids_by_epoch(batches), 0)
    assert sorted(epoch0) == list(range(n)) and set(epoch0.values()) == {1}


@pytest.mark.parametrize("new_world,new_workers,new_batch", [(1, 3, 4), (3, 1, 2), (2, 0, 8)])
def test_elastic_resume_reads_the_rest_of_the_epoch_exactly_once(demo_shards, new_world, new_workers, new_batch):
    n = Manifest.load(demo_shards).samples("train")
    before_steps = 60  # batches per rank under 2 ranks x 2 workers, micro-batch 4: ~40% of the epoch
    seen, state = Counter(), None
    for rank in range(2):
        s = stream(demo_shards, rank=rank, world=2, workers=2, batches_per_item=3)
        seen += ids_by_epoch(take(s, before_steps))
        state = s.state_dict(before_steps)
    assert 0 < sum(epoch_ids(seen, 0).values()) < n
    after = 2 * n // (new_world * new_batch) + 8
    for rank in range(new_world):
        s = TokenStream(demo_shards, "train", new_batch, rank, new_world, 0, 32, new_workers)
        s.load_state_dict(state)
        seen += ids_by_epoch(take(s, after))
    epoch0 = epoch_ids(seen, 0)
    assert sorted(epoch0) == list(range(n)), "a window of epoch 0 was dropped"
    assert set(epoch0.values()) == {1}, "a window of epoch 0 was read twice"


def test_resume_on_other_data_fails(demo_shards, tmp_path):
    build(demo_data_config(tmp_path / "other", heldout_fraction=0.2), build_config())
    state = stream(demo_shards).state_dict(5)
    with pytest.raises(DataStateError, match="other data"):
        stream(tmp_path / "other").load_state_dict(state)
    with pytest.raises(DataStateError, match="saved with seed=0, this run has seed=1"):
        stream(demo_shards, seed=1).load_state_dict(state)


def test_pipe_urls_read_the_same_batches(demo_shards):
    local = take(stream(demo_shards), 20)
    piped = take(stream(demo_shards, url="pipe:cat {dir}/{name}"), 20)
    for a, b in zip(local, piped, strict=True):
        assert torch.equal(a["tokens"], b["tokens"])


@pytest.fixture
def shards_copy(demo_shards, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(demo_shards, copy)
    return copy



def corrupt_payload(path: Path, in_manifest: bool = True) -> str:
    """Flips a byte inside the first member's payload (after its 512-byte header); returns its key.
    in_manifest: the manifest records the damaged file (damaged before the manifest was written),
    so the check on first open passes and the block's own checksum must find it."""
    with tarfile.open(path) as tar:
        key = tar.getmembers()[0].name.split(".")[0]
    data = bytearray(path.read_bytes())
    data[512 + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    if in_manifest:
        record_in_manifest(path)
    return key


def record_in_manifest(path: Path) -> None:
    """Rewrites the manifest's size and sha256 of the shard at `path` to what the file now holds."""
    import hashlib
    import json

    manifest = json.loads((path.parent / "manifest.json").read_text())
    for shards in manifest["splits"].values():
        for info in shards:
            if info["name"] == path.name:
                data = path.read_bytes()
                info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (path.parent / "manifest.json").write_text(json.dumps(manifest))


def test_flipped_byte_names_the_shard_and_sample(shards_copy):
    info = Manifest.load(shards_copy).splits["train"][3]
    key = corrupt_payload(shards_copy / info.name)
    n = Manifest.load(shards_copy).samples("train")
    with pytest.raises(CorruptShardError, match=f"{info.name}: sample {key} fails its checksum"):
        take(stream(shards_copy, world=1, batch=4), n // 4 + 1)
    skipping = stream(shards_copy, world=1, batch=4, on_corrupt="skip")
    batches = take(skipping, n // 4 + 4)
    epoch0 = epoch_ids(ids_by_epoch(batches), 0)
    first = sum(s.samples for s in Manifest.load(shards_copy).splits["train"][:3])
    assert not any(first <= i < first + 16 for i in epoch0)  # the 16 windows of the bad block are left out
    assert len(epoch0) == n - 16


def test_truncated_shard_is_an_error_naming_it(shards_copy):
    info = Manifest.load(shards_copy).splits["train"][5]
    path = shards_copy / info.name
    path.write_bytes(path.read_bytes()[: info.bytes // 2])
    n = Manifest.load(shards_copy).samples("train")
    with pytest.raises(DataError, match=f"{info.name}: {info.bytes // 2} bytes, sha256 .*, the manifest says "
                                        f"{info.bytes} bytes"):
        take(stream(shards_copy, world=1, batch=4), n // 4 + 1)
    record_in_manifest(path)  # truncated before the manifest was written: the tar reader finds the end
    # Where the cut lands decides which: inside a tar member, or on a member boundary (a shorter tar).
    with pytest.raises(DataError, match=rf"{info.name}: (unreadable after sample|windows \d+\.\. are missing; "
                                        rf"the manifest says the shard holds {info.samples})"):
        take(stream(shards_copy, world=1, batch=4), n // 4 + 1)


def test_a_pickle_member_is_refused_and_never_unpickled(shards_copy, tmp_path):
    import io
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    info = Manifest.load(shards_copy).splits["train"][0]
    path = shards_copy / info.name
    with tarfile.open(path, "a") as tar:  # append a sample whose member is a pickle
        blob = pickle.dumps(Payload())
        member = tarfile.TarInfo("99999999.pickle")
        member.size = len(blob)
        tar.addfile(member, io.BytesIO(blob))
    record_in_manifest(path)
    n = Manifest.load(shards_copy).samples("train")
    with pytest.raises(CorruptShardError, match="unexpected member"):
        take(stream(shards_copy, world=1, batch=4), n // 4 + 1)
    assert not marker.exists()


def test_doc_starts_mark_the_token_after_each_eos(demo_shards):
    # Every document ends with EOS when packed, so a document begins exactly after an EOS (and the
    # window's first token may be the middle of one).
    eos = Manifest.load(demo_shards).eos_id
    batches = take(stream(demo_shards, world=1, doc_starts=True), 6)
    assert "doc_start" not in take(stream(demo_shards, world=1), 1)[0]
    starts = 0
    for b in batches:
        tokens, doc_start = b["tokens"].long(), b["doc_start"]
        assert doc_start.dtype == torch.bool and doc_start.shape == tokens.shape
        assert torch.equal(doc_start[:, 1:], tokens[:, :-1] == eos)
        starts += int(doc_start.sum())
    assert starts > 0  # the demo's documents (~2k tokens) span many 64-token windows; some start inside one


def corrupt_header(path: Path, block: int) -> str:
    """Damages the tar header of the `.tokens` member of the block-th block; returns its key."""
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".tokens")][block]
    data = bytearray(path.read_bytes())
    data[member.offset + 3] ^= 0x01  # in the member's name: the header checksum no longer matches
    path.write_bytes(bytes(data))
    return member.name.split(".")[0]


def test_a_corrupt_tar_header_loses_only_its_block_and_is_counted(shards_copy, capfd):
    manifest = Manifest.load(shards_copy)
    index = 2
    info = manifest.splits["train"][index]
    key = corrupt_header(shards_copy / info.name, block=2)
    record_in_manifest(shards_copy / info.name)
    n = manifest.samples("train")
    with pytest.raises(CorruptShardError, match=f"{info.name}: sample {key} lacks a member"):
        take(stream(shards_copy, world=1, batch=4), n // 4 + 1)
    capfd.readouterr()
    batches = take(stream(shards_copy, world=1, batch=4, on_corrupt="skip"), n // 4 + 4)
    epoch0 = epoch_ids(ids_by_epoch(batches), 0)
    first = sum(s.samples for s in manifest.splits["train"][:index]) + 2 * 16
    assert not any(first <= i < first + 16 for i in epoch0)  # the 16 windows of the damaged block
    assert len(epoch0) == n - 16  # and only those: the blocks after it are read (tarfile would stop there)
    warning = [x for x in capfd.readouterr().err.splitlines() if info.name in x]
    assert warning and f"16 of the {info.samples} windows the manifest lists are lost" in warning[0]


def test_a_corrupt_shard_in_a_loader_worker_is_named_on_the_error_line(shards_copy):
    info = Manifest.load(shards_copy).splits["train"][3]
    path = shards_copy / info.name
    key = corrupt_payload(path)
    n = Manifest.load(shards_copy).samples("train")
    with pytest.raises(CorruptShardError) as e:
        take(stream(shards_copy, world=1, batch=4, workers=2), n // 4 + 8)
    first_line = str(e.value).splitlines()[0]
    assert first_line.startswith(str(path)) and f"sample {key} fails its checksum" in first_line


def swap(shards: Path, victim: int, source: int) -> tuple[Path, Manifest]:
    """Copies train shard `source` over train shard `victim` (both valid shards of the corpus)."""
    manifest = Manifest.load(shards)
    infos = manifest.splits["train"]
    shutil.copyfile(shards / infos[source].name, shards / infos[victim].name)
    return shards / infos[victim].name, manifest


@pytest.mark.parametrize("url", [None, "pipe:cat {dir}/{name}"])
def test_a_shard_swapped_for_another_is_found_when_first_opened(shards_copy, capfd, url):
    # Each block of the copy passes its own checksum: only the manifest's digest tells the shards apart.
    path, manifest = swap(shards_copy, victim=3, source=4)
    n, first = manifest.samples("train"), sum(s.samples for s in manifest.splits["train"][:3])
    with pytest.raises(CorruptShardError) as e:
        take(stream(shards_copy, world=1, batch=4, url=url), n // 4 + 1)
    assert "\n" not in str(e.value) and str(e.value).endswith("(damaged, or another shard copied over it)")
    assert f"{path}: {path.stat().st_size} bytes, sha256 " in str(e.value)
    capfd.readouterr()
    batches = take(stream(shards_copy, world=1, batch=4, url=url, on_corrupt="skip"), n // 4 + 4)
    epoch0 = epoch_ids(ids_by_epoch(batches), 0)
    victim = manifest.splits["train"][3].samples
    assert len(epoch0) == n - victim and not any(first <= i < first + victim for i in epoch0)
    warnings = [x for x in capfd.readouterr().err.splitlines() if "copied over it" in x]
    assert len(warnings) == 1 and f"left out, {victim} of its {victim} windows lost (data.on_corrupt=skip)" \
        in warnings[0]


def rewrite_block(path: Path, block: int, change) -> str:
    """Rewrites one block of a shard through `change(tokens)`, with a valid checksum, and records the
    new file in the manifest (as a build that wrote such ids would); returns the block's key."""
    from data_pipeline.shards import ShardFile

    manifest = Manifest.load(path.parent)
    blocks = list(read_blocks(str(path), np.dtype(manifest.dtype), manifest.seq_len))
    blocks[block].tokens = change(blocks[block].tokens.copy())
    out = ShardFile(path, manifest.seq_len)
    for b in blocks:
        out.add(b)
    out.finish()
    record_in_manifest(path)
    return blocks[block].key


def test_token_ids_outside_the_vocabulary_are_named_per_block(shards_copy, capfd):
    # Without the check an id >= vocab fails in the embedding as "IndexError: index out of range in
    # self" (a device-side assert on a GPU), with no shard named.
    manifest = Manifest.load(shards_copy)
    info = manifest.splits["train"][2]

    def plant(tokens):
        tokens[3, 5] = manifest.vocab_size + 6
        return tokens

    key = rewrite_block(shards_copy / info.name, 1, plant)
    n = manifest.samples("train")
    with pytest.raises(CorruptShardError) as e:
        take(stream(shards_copy, world=1, batch=4), n // 4 + 1)
    assert str(e.value) == (f"{shards_copy / info.name}: sample {key} has token id {manifest.vocab_size + 6} >= "
                            f"the vocabulary ({manifest.vocab_size}, manifest.json)")
    capfd.readouterr()
    batches = take(stream(shards_copy, world=1, batch=4, on_corrupt="skip"), n // 4 + 4)
    epoch0 = epoch_ids(ids_by_epoch(batches), 0)
    first = sum(s.samples for s in manifest.splits["train"][:2]) + 16
    assert len(epoch0) == n - 16 and not any(first <= i < first + 16 for i in epoch0)
    assert all(int(b["tokens"].long().max()) < manifest.vocab_size for b in batches)
    assert f"skipped 1 corrupt sample(s) ['{key}']: 16 of the" in capfd.readouterr().err


def test_a_job_wide_signal_leaves_the_loader_workers_to_their_rank(demo_shards):
    # scancel and SLURM preemptions signal every process of the job; a loader worker that died of it
    # would fail the rank's next batch while the rank is stopping cleanly.
    import os
    import signal

    import psutil

    before = {p.pid for p in psutil.Process().children()}
    batches = iter(make_loader(stream(demo_shards, world=1, batch=4, workers=2)))
    next(batches)
    workers = [p for p in psutil.Process().children() if p.pid not in before]
    assert len(workers) == 2
    for w in workers:  # from another process, as slurmstepd's would be (the rank's own SIGTERM ends a worker)
        subprocess.run(["kill", "-TERM", str(w.pid)], check=True)
        os.kill(w.pid, signal.SIGUSR1)
    for _ in range(40):
        next(batches)
    assert all(w.is_running() for w in workers)


# A rank whose loader is still open when it exits: Python ends daemon processes by SIGTERM and a join.
HELD_LOADER = """
import subprocess, sys, psutil
from data_pipeline.stream import make_loader
from tests.data_pipeline.test_stream import stream
KEEP = iter(make_loader(stream(sys.argv[1], world=1, batch=4, workers=2)))
next(KEEP)
for w in psutil.Process().children():
    if w.name() != "kill":
        subprocess.run(["kill", "-TERM", str(w.pid)])  # a job-wide signal: ignored
next(KEEP)
print("exiting", flush=True)
"""


def test_a_rank_still_exits_with_its_loader_open(demo_shards):
    proc = subprocess.run([sys.executable, "-c", HELD_LOADER, str(demo_shards)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)  # it hung at exit: workers kept alive
    assert proc.returncode == 0 and proc.stdout == "exiting\n", proc.stderr[-2000:]
