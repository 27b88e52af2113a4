"""Data pipeline throughput: build and stream, each side by side with a baseline in one run.

    .venv/bin/python bench/data.py [--copies 128] [--seq-len 4096] [--workers 2] [--seconds 8] [--smoke]

Corpus: the English text of Python's pydoc_data.topics (the demo corpus), written `--copies` times
over 16 .jsonl files, so that every worker has files to tokenize.
- build: `python -m data_pipeline.build`'s code path with `--workers` processes (tokenize, pack,
  write shards, manifest) vs raw `tokenizers` encode_batch on the same texts in one call (its own
  threads use every core). Alternated twice; best of each kept.
- stream: our TokenStream through a DataLoader with `--workers` workers vs a plain webdataset reader
  of the same windows stored one `.npy` per sample, batched alike, through the same DataLoader setup.
  Both run after a warm-up batch (worker start-up not counted), twice each, alternating; best kept.
- shard checks: the same TokenStream with its checks on (each shard's size and sha256 against the
  manifest when this process first opens it, every block's ids against the vocabulary) vs off: over
  `--seconds` as above (several epochs: the ids check and the first epoch's hashing), and over the
  first epoch of a new stream alone (every shard opened for the first time: the hashing's worst case).
- peak RSS of our loader's worker processes.
Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_pipeline.build import build  # noqa: E402
from data_pipeline.config import BuildConfig, DataConfig  # noqa: E402
from data_pipeline.shards import Manifest, read_blocks  # noqa: E402
from data_pipeline.sources import demo_documents  # noqa: E402
from data_pipeline.stream import TokenStream, make_loader  # noqa: E402
from data_pipeline.tokenizer import train_bpe  # noqa: E402

FILES = 16
MICRO_BATCH = 4


def write_corpus(root: Path, copies: int) -> list[str]:
    docs = demo_documents()
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for f in range(FILES):
        share = [d for c in range(copies) for i, d in enumerate(docs) if (c * len(docs) + i) % FILES == f]
        (root / f"part{f:02d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in share))
        texts += share
    return texts


def bench_build(work: Path, texts: list[str], seq_len: int, workers: int) -> dict:
    """encode_batch on all texts vs the build of the same files; alternated twice, best of each kept."""
    tok = train_bpe(demo_documents(), 8192)
    tok.save(str(work / "tokenizer.json"))
    cfg = DataConfig(inputs=[str(work / "corpus")], dir=str(work / "shards"), format="text", text_field="text",
                     prompt_field="prompt", response_field="response", tokenizer=str(work / "tokenizer.json"),
                     vocab_size=8192, seq_len=seq_len, shard_bytes=2 << 20, member_bytes=512 << 10,
                     heldout_fraction=0.001, on_decode_error="replace", shuffle_buffer=1024, num_workers=workers,
                     url=None, on_corrupt="error", batches_per_item=16)
    raw_rates, build_rates = [], []
    for _ in range(2):
        start = time.perf_counter()
        raw_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
        raw_rates.append(raw_tokens / (time.perf_counter() - start))
        shutil.rmtree(cfg.dir, ignore_errors=True)
        start = time.perf_counter()
        build(cfg, BuildConfig(workers=workers, task=0, tasks=1, merge=True, progress=False, progress_every_s=0))
        # tokens as the raw encoder counts them (the build adds one EOS per document on top)
        build_rates.append(raw_tokens / (time.perf_counter() - start))
    return {"tokenizer_tokens_per_s": max(raw_rates), "build_tokens_per_s": max(build_rates), "tokens": raw_tokens}


def write_npy_baseline(shards: Path, out: Path) -> list[str]:
    """The same training windows, one .npy member per window, in tars of the same sizes."""
    manifest = Manifest.load(shards)
    out.mkdir(parents=True, exist_ok=True)
    urls = []
    for j, info in enumerate(manifest.splits["train"]):
        path = out / f"npy-{j:05d}.tar"
        with tarfile.open(path, "w") as tar:
            k = 0
            for block in read_blocks(str(shards / info.name), np.dtype(manifest.dtype), manifest.seq_len):
                for window in block.tokens:
                    buf = io.BytesIO()
                    np.save(buf, window)
                    member = tarfile.TarInfo(f"{j:05d}{k:08d}.npy")
                    member.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(member, buf)
                    k += 1
        urls.append(str(path))
    return urls


def baseline_loader(urls: list[str], workers: int):
    import webdataset as wds
    from torch.utils.data import DataLoader

    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False).repeat(10**6)
          .decode().to_tuple("npy").batched(MICRO_BATCH, partial=False))
    return DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False, prefetch_factor=4)


def measure(loader, tokens_of, seconds: float, watch_rss: bool = False) -> tuple[float, float, float]:
    """tokens/s over `seconds` after the first batch; the peak RSS and USS (memory of its own, not
    shared with the parent it was forked from) in MB of the loader's workers."""
    it = iter(loader)
    next(it)
    procs = psutil.Process().children(recursive=True) if watch_rss else []  # the loader workers
    rss, uss, tokens, n = 0.0, 0.0, 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += tokens_of(next(it))
        n += 1
        if procs and n % 256 == 0:
            for p in procs:
                info = p.memory_full_info()
                rss, uss = max(rss, info.rss / 2**20), max(uss, info.uss / 2**20)
    rate = tokens / (time.perf_counter() - start)
    del it
    return rate, rss, uss


def bench_stream(work: Path, workers: int, batches_per_item: int, seconds: float) -> dict:
    """Run in a fresh process (see main), so the workers' RSS is not inflated by the build's heap."""
    urls = write_npy_baseline(work / "shards", work / "npy")

    def ours(verify: bool) -> TokenStream:  # a new stream each time: each shard is hashed on first open again
        return TokenStream(work / "shards", "train", MICRO_BATCH, rank=0, world_size=1, seed=0, shuffle_buffer=1024,
                           num_workers=workers, batches_per_item=batches_per_item, verify_shards=verify)

    epoch = Manifest.load(work / "shards").totals["train"]["tokens"]
    stream_rates, unchecked_rates, base_rates, first, first_unchecked, rss, uss = [], [], [], [], [], 0.0, 0.0
    for _ in range(2):
        rate, r, u = measure(make_loader(ours(True)), lambda x: x["tokens"].numel(), seconds, watch_rss=True)
        stream_rates.append(rate)
        rss, uss = max(rss, r), max(uss, u)
        unchecked_rates.append(measure(make_loader(ours(False)), lambda x: x["tokens"].numel(), seconds)[0])
        base_rates.append(measure(baseline_loader(urls, workers), lambda x: x[0].numel(), seconds)[0])
        first.append(first_pass(make_loader(ours(True)), epoch))
        first_unchecked.append(first_pass(make_loader(ours(False)), epoch))
    return {"stream": max(stream_rates), "unchecked": max(unchecked_rates), "baseline": max(base_rates),
            "first_pass": max(first), "first_pass_unchecked": max(first_unchecked), "rss": rss, "uss": uss}


def first_pass(loader, tokens: int) -> float:
    """tokens/s of a new stream's first `tokens` (one epoch: every shard opened for the first time),
    worker start-up included (its first batch waits for the first shard's check)."""
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += batch["tokens"].numel()
        if n >= tokens:
            break
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--batches-per-item", type=int, default=16)
    parser.add_argument("--work", default="outputs/bench/data")
    parser.add_argument("--stream-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="seconds: 1 copy, seq 128, 1 worker, 0.5 s per stream")
    args = parser.parse_args()
    if args.smoke:  # the code paths, not the speed (tests/bench/test_smoke.py)
        args.copies, args.seq_len, args.workers, args.seconds, args.batches_per_item = 1, 128, 1, 0.5, 2
        args.work = args.work if args.work != "outputs/bench/data" else "outputs/bench/data-smoke"
    work = ROOT / args.work
    if args.stream_only:
        print(json.dumps(bench_stream(work, args.workers, args.batches_per_item, args.seconds)))
        return
    shutil.rmtree(work, ignore_errors=True)
    b = bench_build(work, write_corpus(work / "corpus", args.copies), args.seq_len, args.workers)
    child = subprocess.run([sys.executable, __file__, "--stream-only", *sys.argv[1:]], check=True,
                           capture_output=True, text=True)
    st = json.loads(child.stdout.strip().splitlines()[-1])
    result = {"build_tokens_per_s": round(b["build_tokens_per_s"]),
              "tokenizer_tokens_per_s": round(b["tokenizer_tokens_per_s"]),
              "build_ratio": round(b["build_tokens_per_s"] / b["tokenizer_tokens_per_s"], 3),
              "stream_tokens_per_s": round(st["stream"]), "baseline_tokens_per_s": round(st["baseline"]),
              "stream_ratio": round(st["stream"] / st["baseline"], 2),
              "stream_unchecked_tokens_per_s": round(st["unchecked"]),
              "checks_ratio": round(st["stream"] / st["unchecked"], 3),
              "first_pass_tokens_per_s": round(st["first_pass"]),
              "first_pass_unchecked_tokens_per_s": round(st["first_pass_unchecked"]),
              "first_pass_checks_ratio": round(st["first_pass"] / st["first_pass_unchecked"], 3),
              "peak_worker_rss_mb": round(st["rss"], 1),
              "peak_worker_uss_mb": round(st["uss"], 1), "corpus_tokens": b["tokens"], "seq_len": args.seq_len,
              "micro_batch": MICRO_BATCH, "batches_per_item": args.batches_per_item, "workers": args.workers,
              "cpus": os.cpu_count()}
    print(f"{'what':<34} {'ours tok/s':>14} {'baseline tok/s':>15} {'ratio':>7}")
    print(f"{'build (' + str(args.workers) + ' workers) vs encode_batch':<34} {result['build_tokens_per_s']:>14,} "
          f"{result['tokenizer_tokens_per_s']:>15,} {result['build_ratio']:>7}")
    print(f"{'stream vs webdataset .npy reader':<34} {result['stream_tokens_per_s']:>14,} "
          f"{result['baseline_tokens_per_s']:>15,} {result['stream_ratio']:>7}")
    print(f"{'stream: shard checks on vs off':<34} {result['stream_tokens_per_s']:>14,} "
          f"{result['stream_unchecked_tokens_per_s']:>15,} {result['checks_ratio']:>7}")
    print(f"{'  first epoch (every shard hashed)':<34} {result['first_pass_tokens_per_s']:>14,} "
          f"{result['first_pass_unchecked_tokens_per_s']:>15,} {result['first_pass_checks_ratio']:>7}")
    print(f"stream worker peak RSS {result['peak_worker_rss_mb']} MB, of it its own (USS) "
          f"{result['peak_worker_uss_mb']} MB; corpus {b['tokens']:,} tokens")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
