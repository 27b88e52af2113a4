"""Issue 26, the data side: files named by data (manifest entries, shards, the manifest itself, the
data directory's tokenizer) are read only inside data.dir, only if regular, with a size cap, and a
planted one is refused in one line naming it, before anything is streamed. Loader workers end with
their rank, and a job-wide signal never kills one that is starting. Empty inputs are named."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import data_pipeline.stream as stream_module
from data_pipeline import shards as shards_module
from data_pipeline.build import build, ensure_built
from data_pipeline.shards import CorruptShardError, DataError, Manifest
from data_pipeline.stream import make_loader
from data_pipeline.tokenizer import load_tokenizer
from tests.conftest import REPO, build_config, child_env, data_config, demo_data_config
from tests.data_pipeline.test_stream import stream, take


@pytest.fixture
def shards_copy(demo_shards, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(demo_shards, copy)
    return copy


def victim(directory: Path, index: int = 2) -> Path:
    return directory / Manifest.load(directory).splits["train"][index].name


def plant(directory: Path, how: str, outside: Path) -> str:
    """Plants `how` in place of train shard 2 (or its manifest entry); returns what the error must name."""
    path = victim(directory)
    if how.startswith("entry "):  # the manifest's entry itself names something else
        raw = json.loads((directory / "manifest.json").read_text())
        raw["splits"]["train"][2]["name"] = how.removeprefix("entry ")
        (directory / "manifest.json").write_text(json.dumps(raw))
        return repr(how.removeprefix("entry "))
    path.unlink()
    if how == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    elif how == "FIFO":
        os.mkfifo(path)
    elif how == "symlink outside data.dir":
        outside.write_bytes(b"\0" * 1024)
        path.symlink_to(outside)
    elif how == "folder":
        path.mkdir()
    return str(path)


PLANTS = ["symlink to /dev/zero", "FIFO", "symlink outside data.dir", "folder", "entry ../../../../dev/zero",
          "entry /dev/zero", "entry train-000000.tar;touch pwned", "entry ../data/train-000001.tar"]


@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
@pytest.mark.parametrize("how", PLANTS)
def test_a_planted_shard_is_refused_at_start_naming_it(shards_copy, tmp_path, how, on_corrupt):
    named = plant(shards_copy, how, tmp_path / "elsewhere.tar")
    start = time.monotonic()
    with pytest.raises(DataError) as e:  # a FIFO must not block, /dev/zero must not be read
        ensure_built(demo_data_config(shards_copy, on_corrupt=on_corrupt))
    assert time.monotonic() - start < 60
    assert "\n" not in str(e.value) and named in str(e.value), str(e.value)
    assert not (shards_copy / "pwned").exists()


@pytest.mark.parametrize("how", ["symlink to /dev/zero", "FIFO", "symlink outside data.dir"])
def test_a_stream_never_reads_a_planted_shard(shards_copy, tmp_path, how):
    # Tools that stream without ensure_built (bench/, evaluate) go through the same open.
    named = plant(shards_copy, how, tmp_path / "elsewhere.tar")
    n = Manifest.load(shards_copy).samples("train")
    with pytest.raises(DataError) as e:  # every shard of an epoch is opened
        take(stream(shards_copy, world=1, workers=2, on_corrupt="skip"), n // 4 + 8)
    assert str(e.value).startswith(named) and "refusing to read it" in str(e.value)


def test_validate_names_a_planted_shard_without_reading_it(shards_copy, tmp_path):
    named = plant(shards_copy, "symlink to /dev/zero", tmp_path / "x")
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.validate", str(shards_copy)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    problems = proc.stdout.splitlines()[:-1]
    assert proc.returncode == 1 and problems == [f"{named}: resolves to /dev/zero, outside "
                                                 f"{os.path.realpath(shards_copy)}; refusing to read it"]


@pytest.mark.parametrize("how", ["truncated", "not an object", "symlink to /dev/zero", "FIFO", "too large",
                                 "entry without sizes"])
def test_a_bad_manifest_is_one_line_naming_it(shards_copy, monkeypatch, how):
    path = shards_copy / "manifest.json"
    text = path.read_text()
    if how == "truncated":
        path.write_text(text[: len(text) // 2])
    elif how == "not an object":
        path.write_text("[1, 2]")
    elif how == "symlink to /dev/zero":
        path.unlink()
        path.symlink_to("/dev/zero")
    elif how == "FIFO":
        path.unlink()
        os.mkfifo(path)
    elif how == "too large":
        monkeypatch.setattr(shards_module, "MANIFEST_MAX_BYTES", len(text) - 1)
    elif how == "entry without sizes":
        raw = json.loads(text)
        raw["splits"]["train"][0]["bytes"] = "12; rm -rf"
        path.write_text(json.dumps(raw))
    for call in (lambda: Manifest.load(shards_copy), lambda: ensure_built(demo_data_config(shards_copy))):
        with pytest.raises(DataError) as e:
            call()
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value), str(e.value)
        assert "rm -rf" not in str(e.value)  # a file's content is never echoed


def test_the_data_directorys_tokenizer_is_confined(shards_copy, tmp_path):
    tok = shards_copy / "tokenizer.json"
    assert load_tokenizer(tok, root=shards_copy).get_vocab_size() > 0
    tok.unlink()
    tok.symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"tokenizer.json: resolves to /dev/zero, outside .*; refusing to read it$"):
        load_tokenizer(tok, root=shards_copy)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # a tokenizer the user names is not confined to a root, but a FIFO is still refused
    with pytest.raises(DataError, match=r"not a regular file \(a FIFO\)"):
        load_tokenizer(fifo)


def test_a_swapped_shard_is_refused_at_start_under_the_demo_data(shards_copy):
    infos = Manifest.load(shards_copy).splits["train"]
    # Two shards of the same size: only the sha256 tells them apart.
    source, target = next((i, j) for i in range(len(infos)) for j in range(i + 1, len(infos))
                          if infos[i].bytes == infos[j].bytes)
    shutil.copyfile(shards_copy / infos[source].name, shards_copy / infos[target].name)
    with pytest.raises(CorruptShardError) as e:
        ensure_built(demo_data_config(shards_copy))
    assert str(e.value).startswith(f"{shards_copy / infos[target].name}: ") and "sha256" in str(e.value)
    assert str(e.value).endswith("(damaged, or another shard copied over it)")
    ensure_built(demo_data_config(shards_copy, on_corrupt="skip"))  # skip: the stream leaves it out, with a warning
    # data=files checks sizes at start (cheap on any corpus) and each sha256 when the stream opens the shard.
    files = data_config(shards_copy, inputs=())
    ensure_built(files)
    other = next(i for i in range(len(infos)) if infos[i].bytes != infos[-1].bytes)
    shutil.copyfile(shards_copy / infos[-1].name, shards_copy / infos[other].name)  # the last, shorter shard
    with pytest.raises(CorruptShardError, match=f"^{shards_copy / infos[other].name}: .* bytes, the manifest says"):
        ensure_built(files)


def test_empty_inputs_are_named(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.jsonl").write_text("")
    (corpus / "blank.jsonl").write_text("\n\n")
    (corpus / "empty.txt").write_text("")
    (corpus / "doc.txt").write_text("some words of a document, repeated. " * 200)
    for alone in ("empty.jsonl", "empty.txt"):
        with pytest.raises(DataError, match=f"^{corpus / alone}: no document in the input"):
            build(data_config(tmp_path / f"out-{alone}", [str(corpus / alone)], vocab_size=300), build_config())
    with pytest.raises(DataError, match=r"blank.jsonl and 2 more: no document in the input \(empty\); nothing to"):
        build(data_config(tmp_path / "out-all", [str(corpus / n) for n in ("blank.jsonl", "empty.jsonl",
                                                                              "empty.txt")], vocab_size=300),
              build_config())
    # Beside inputs that hold documents: a warning naming them, and the build goes on without them.
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.build", "data=files",
                           f"data.inputs=[{corpus / 'empty.txt'},{corpus / 'doc.txt'},{corpus / 'empty.jsonl'}]",
                           f"data.dir={tmp_path / 'out-mixed'}", "data.vocab_size=300", "trainer.seq_len=16",
                           "build.progress=false"], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "no document" in line]
    assert warnings == [f"warning: {corpus / 'empty.txt'} and 1 more: no document in the input (empty); built from "
                        f"the other 1 input(s)"]
    assert Manifest.load(tmp_path / "out-mixed").documents["documents"] == 1


# A rank that holds a loader with two workers, the second stuck in a read that never returns (the
# issue's shard on /dev/zero: a stuck worker never looks at torch's parent watchdog), then waits to
# be killed.
HELD = """
import sys, time, psutil
import data_pipeline.stream as module
from data_pipeline.stream import make_loader
from torch.utils.data import get_worker_info
from tests.data_pipeline.test_stream import stream
real = module.TokenStream.__iter__
def stuck(self):
    if get_worker_info().id == 1:
        time.sleep(10**6)
    yield from real(self)
module.TokenStream.__iter__ = stuck
batches = iter(make_loader(stream(sys.argv[1], world=1, batch=4, workers=2)))
next(batches)
print(" ".join(str(p.pid) for p in psutil.Process().children()), flush=True)
sys.stdin.read()
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # reparented, not reaped yet: dead
    except psutil.NoSuchProcess:
        return True


def test_loader_workers_die_with_their_rank_killed_by_sigkill(demo_shards):
    rank = subprocess.Popen([sys.executable, "-c", HELD, str(demo_shards)], cwd=REPO, env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in rank.stdout.readline().split()]
        assert len(workers) == 2 and not any(gone(w) for w in workers)
        rank.kill()  # SIGKILL: no atexit, no DataLoader shutdown
        rank.wait(timeout=60)
        deadline = time.monotonic() + 120  # a generous bound; the kernel's PDEATHSIG is immediate
        while not all(gone(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(w) for w in workers), f"orphaned loader workers: {[w for w in workers if not gone(w)]}"
    finally:
        rank.kill()
        for w in workers if "workers" in locals() else ():
            if not gone(w):
                os.kill(w, signal.SIGKILL)  # ours: never left spinning after a failure
        rank.stdout.close()
        rank.stdin.close()


def test_a_job_wide_signal_while_workers_start_kills_none(demo_shards, monkeypatch):
    # The signals are sent from another process (as slurmstepd's) to each worker before its own init
    # runs: the worst moment, made certain instead of raced. A worker born with them unblocked died of
    # the SIGTERM there ("DataLoader worker (pid ...) is killed by signal: Terminated").
    original = stream_module.ignore_stop_signals

    def signalled_before_init(worker_id: int) -> None:
        for sig in ("-TERM", "-USR1", "-INT"):
            subprocess.run(["kill", sig, str(os.getpid())], check=True)
        pending = signal.sigpending()
        assert {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT} <= pending, pending
        original(worker_id)

    monkeypatch.setattr(stream_module, "ignore_stop_signals", signalled_before_init)
    before = {p.pid for p in psutil.Process().children()}
    batches = iter(make_loader(stream(demo_shards, world=1, batch=4, workers=2)))
    for _ in range(40):
        next(batches)
    workers = [p for p in psutil.Process().children() if p.pid not in before and p.name() != "kill"]
    assert len(workers) == 2 and all(w.is_running() for w in workers)
    assert not ({signal.SIGTERM, signal.SIGUSR1, signal.SIGINT} & signal.pthread_sigmask(signal.SIG_BLOCK, []))
