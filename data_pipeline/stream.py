"""Stream packed windows from shards as endless, seeded, resumable micro-batches for one rank.

Readers are (rank, DataLoader worker) pairs; data_pipeline/plan.py decides which positions each
reader reads, so each reader opens only its own shards and the stream never runs dry. A worker hands
the DataLoader `batches_per_item` micro-batches at once (passing an item between processes costs far
more than reading it), and `make_loader` cuts items back into micro-batches. A micro-batch is a
dict: `tokens` [B, L] in the shards' integer type (uint16 or uint32; the trainer widens it on the
device), `ids` [B] global window ids, `epoch` [B], and `prompt_len` [B] for SFT shards.

Resume is exact: the stream is a pure function of (manifest, seed, plan, layout), so after `batches`
micro-batches a new stream told to start there yields what the first would have yielded next. With
another world size, worker count, micro-batch size or item size, the plan is redrawn so that every position
not yet read is read exactly once. The state records the manifest's fingerprint, so a resume on
other data fails.
"""

from __future__ import annotations

import ctypes
import errno
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.plan import Plan, Visits, replan
from data_pipeline.shards import (
    CorruptShardError,
    DataError,
    Manifest,
    digest_problem,
    digest_stream,
    open_shard,
    open_url,
    read_blocks,
)

ERROR_KEY = "data_error"  # an item that carries a DataError out of a DataLoader worker


class DataStateError(DataError):
    """A saved stream state that does not fit the data it is loaded into."""


class TokenStream(IterableDataset):
    def __init__(self, directory: str | Path, split: str, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int, num_workers: int = 0, url: str | None = None,
                 on_corrupt: str = "error", batches_per_item: int = 1, doc_starts: bool = False,
                 verify_shards: bool = True):
        self.directory = Path(directory)
        self.manifest = Manifest.load(directory)
        if split not in self.manifest.splits or self.manifest.samples(split) == 0:
            raise DataError(f"{self.directory}/manifest.json has no samples in split {split!r}")
        if on_corrupt not in ("error", "skip"):
            raise DataError(f"data.on_corrupt={on_corrupt!r} is not one of error, skip")
        self.split, self.micro_batch_size, self.seed = split, micro_batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer, self.url, self.on_corrupt = max(1, shuffle_buffer), url, on_corrupt
        self.batches_per_item = max(1, batches_per_item)
        self.doc_starts = doc_starts  # batches also carry "doc_start" [B, L] bool (document-masked attention)
        shards = self.manifest.splits[split]
        self.visits = Visits([s.samples for s in shards], seed, split)
        self.urls = [url.format(dir=self.directory, name=s.name) if url else str(self.directory / s.name)
                     for s in shards]
        self.plan = Plan(self.readers)
        self.start_batch = 0  # micro-batches of this plan consumed before this stream started
        # Each shard is checked against the manifest (size, sha256) when this process first opens it
        # (shard index -> the problem found, or None), and each block's ids against the vocabulary.
        # verify_shards=False turns both off: bench/data.py's baseline, to measure what they cost.
        self.verify_shards = verify_shards
        self.checked: dict[int, str | None] = {}
        self.warned: set[int] = set()  # shards left out whose warning was printed

    @property
    def readers(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    # -- resume state -------------------------------------------------------------------------
    def state_dict(self, batches_consumed: int) -> dict:
        """`batches_consumed`: micro-batches this process took from the stream."""
        return {"fingerprint": self.manifest.fingerprint(), "split": self.split, "seed": self.seed,
                "batches": self.start_batch + batches_consumed, "world_size": self.world_size,
                "num_workers": self.num_workers, "micro_batch_size": self.micro_batch_size,
                "batches_per_item": self.batches_per_item,
                "shuffle_buffer": self.shuffle_buffer, "plan": self.plan.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.manifest.fingerprint():
            raise DataStateError(f"the checkpoint's data state is for other data (fingerprint {state['fingerprint']}) "
                                 f"than {self.directory} (fingerprint {self.manifest.fingerprint()})")
        for key in ("seed", "shuffle_buffer"):
            if state[key] != getattr(self, key):
                raise DataStateError(f"the checkpoint's data state was saved with {key}={state[key]}, this run has "
                                     f"{key}={getattr(self, key)}; the order of the data would change")
        plan = Plan.from_dict(state["plan"])
        layout = ("world_size", "num_workers", "micro_batch_size", "batches_per_item")
        if all(state[k] == getattr(self, k) for k in layout):
            self.plan, self.start_batch = plan, int(state["batches"])
            return
        # Elastic: what each reader of the old layout consumed, then a plan for the new readers.
        workers, per_item = max(state["num_workers"], 1), state["batches_per_item"]
        consumed = [batches_of_role(r % workers, state["batches"], workers, per_item) * state["micro_batch_size"]
                    for r in range(plan.readers)]
        self.plan, self.start_batch = replan(plan, consumed, self.readers, self.visits), 0

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """Items of batches_per_item micro-batches (make_loader cuts them apart)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader takes its j-th item from worker j % workers, and item j holds micro-batches
        # j*K .. j*K+K-1 of this plan, read by reader role j % workers. After a resume at start_batch
        # (within item j0), worker w plays role (w + j0) % workers and skips that role's items
        # before j0; make_loader drops the consumed head of item j0.
        K = self.batches_per_item
        first_item = self.start_batch // K
        role = (worker + first_item) % workers
        consumed = len(range(role, first_item, workers)) * K * self.micro_batch_size
        ranges = self.plan.ranges_after(self.rank * workers + role, consumed, self.visits)
        if info is None:
            yield from self._batches(ranges, K * self.micro_batch_size)
            return
        try:
            yield from self._batches(ranges, K * self.micro_batch_size)
        except DataError as e:
            # The DataLoader would re-raise this in the trainer as "Caught CorruptShardError in
            # DataLoader worker process 1", the shard's name far below; as an item, make_loader
            # raises it with its own message (the shard and sample) on the line the user sees.
            yield {ERROR_KEY: str(e), "kind": type(e).__name__}

    def _batches(self, ranges, B: int) -> Iterator[dict]:
        """Cuts the parts into batches of B windows: slices of a part where possible (no copy), a join
        only for a batch that spans two parts."""
        pending: list[dict[str, np.ndarray]] = []
        have = 0
        for part in self._windows(ranges):
            n, i = len(part["ids"]), 0
            if have:
                i = min(B - have, n)
                pending.append({k: v[:i] for k, v in part.items()})
                have += i
                if have == B:
                    yield _tensors({k: np.concatenate([p[k] for p in pending]) for k in part})
                    pending, have = [], 0
            while n - i >= B:
                yield _tensors({k: v[i: i + B] for k, v in part.items()})
                i += B
            if i < n:
                pending.append({k: v[i:] for k, v in part.items()})
                have += n - i

    def _windows(self, ranges) -> Iterator[dict[str, np.ndarray]]:
        """For each range, its windows in read order, a chunk at a time."""
        C = self.shuffle_buffer
        for g, k0, k1 in ranges:
            shard = self.visits.shard(g)
            chunks = self._chunks(shard, k0 // C, (k1 - 1) // C)
            for c, windows, valid, prompt, starts in chunks:
                order = self.visits.chunk_order(g, c, len(windows))
                lo, hi = max(k0 - c * C, 0), min(k1 - c * C, len(windows))
                pick = order[lo:hi]
                pick = pick[valid[pick]]  # rows of corrupt blocks are left out (on_corrupt=skip)
                part = {"tokens": windows[pick], "ids": self.visits.first_id[shard] + c * C + pick,
                        "epoch": np.full(len(pick), self.visits.epoch(g), dtype=np.int64)}
                if prompt is not None:
                    part["prompt_len"] = prompt[pick]
                if starts is not None:
                    part["doc_start"] = starts[pick]
                yield part

    def _open_checked(self, shard: int):
        """The shard's bytes to read (None: read them from its URL) and the problem found, if any. The
        first time this process opens a shard, its size and sha256 are checked against the manifest:
        a damaged shard, or another (valid) shard copied over it, would otherwise train silently. A
        shard in data.dir is opened once (_open_local), hashed, and read from the same descriptor; a
        `pipe:` URL is read once, hashed and spooled (memory, then a temporary file) for the read."""
        if not self.verify_shards or self.checked.get(shard, "") is None:
            return (self._open_local(shard) if self.url is None else None), None
        if shard in self.checked:
            return None, self.checked[shard]
        url, info = self.urls[shard], self.manifest.splits[self.split][shard]
        spool = None
        try:
            if url.startswith("pipe:"):
                spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)
                with open_url(url) as f:
                    size, sha = digest_stream(f, into=spool)
            else:  # the file that is hashed is the file that is read: no swap in between
                spool = self._open_local(shard) if self.url is None else open_url(url)
                size, sha = digest_stream(spool)
            spool.seek(0)
            problem = digest_problem(url, size, sha, info)
        except OSError as e:
            problem = f"{url}: unreadable ({e.strerror or e})"
        self.checked[shard] = problem
        if problem and spool is not None:
            spool.close()
            spool = None
        return spool, problem

    def _open_local(self, shard: int):
        """A shard in data.dir, opened through data_pipeline/confined.py (inside data.dir after realpath, a
        regular file): a name or symlink planted in the manifest or the directory never makes this rank
        read /dev/zero, a FIFO or a file elsewhere. A DataError naming the shard, whatever on_corrupt says."""
        name = self.manifest.splits[self.split][shard].name
        if not os.path.lexists(self.directory / name):  # missing: damaged data, left to data.on_corrupt
            raise FileNotFoundError(errno.ENOENT, "no such file", str(self.directory / name))
        return open_shard(self.directory, name)

    def _chunks(self, shard: int, first: int, last: int):
        """Chunks first..last of a shard as (index, windows, valid rows, prompt lengths, document starts
        [rows, L] bool or None), read in one sequential pass. Rows of blocks left out as corrupt
        (data.on_corrupt=skip) are not valid; so are all rows of a shard that is not the one the
        manifest lists, and of a block holding a token id outside the vocabulary."""
        C, L, n = self.shuffle_buffer, self.manifest.seq_len, self.visits.sizes[shard]
        dtype, url = np.dtype(self.manifest.dtype), self.urls[shard]
        skipped: list[str] = []
        spool, shard_problem = self._open_checked(shard)
        if shard_problem and self.on_corrupt != "skip":
            raise CorruptShardError(shard_problem)
        blocks = iter(()) if shard_problem else read_blocks(url, dtype, L, self.on_corrupt, skipped, fileobj=spool)
        if self.verify_shards and not shard_problem:
            blocks = self._in_vocabulary(blocks, url, skipped)
        carry = None  # a block that reaches into the next chunk
        lost = 0  # windows of the range read that were in corrupt blocks (on_corrupt=skip)
        try:
            for c in range(first, last + 1):
                lo, hi = c * C, min((c + 1) * C, n)
                rows, valid = np.zeros((hi - lo, L), dtype), np.zeros(hi - lo, dtype=bool)
                prompt = np.zeros(hi - lo, dtype=np.int64) if self.manifest.format == "sft" else None
                starts = np.zeros((hi - lo, L), dtype=bool) if self.doc_starts else None
                while True:
                    block, carry = carry or next(blocks, None), None
                    if block is None:
                        break
                    b0, b1 = block.first, block.first + len(block.tokens)
                    if b1 <= lo:
                        continue
                    s0, s1 = max(b0, lo), min(b1, hi)
                    rows[s0 - lo: s1 - lo] = block.tokens[s0 - b0: s1 - b0]
                    valid[s0 - lo: s1 - lo] = True
                    if prompt is not None:
                        prompt[s0 - lo: s1 - lo] = block.prompt[s0 - b0: s1 - b0]
                    if starts is not None:
                        starts[s0 - lo: s1 - lo] = block.start_rows()[s0 - b0: s1 - b0]
                    if b1 > hi:
                        carry = block
                        break
                if not valid.all() and self.on_corrupt != "skip":
                    raise CorruptShardError(f"{url}: windows {lo + int(np.argmin(valid))}.. are missing; the "
                                            f"manifest says the shard holds {n}")
                lost += int((~valid).sum())
                yield c, rows, valid, prompt, starts
        finally:
            if hasattr(blocks, "close"):
                blocks.close()
            if shard_problem and shard not in self.warned:  # once: it is left out of every epoch
                self.warned.add(shard)
                print(f"warning: {shard_problem}: left out, {n} of its {n} windows lost (data.on_corrupt=skip)",
                      file=sys.stderr, flush=True)
            elif skipped or lost:
                print(f"warning: {url}: skipped {len(skipped)} corrupt sample(s) {skipped[:5]}: {lost} of the {n} "
                      f"windows the manifest lists are lost (data.on_corrupt=skip)", file=sys.stderr, flush=True)

    def _in_vocabulary(self, blocks, url: str, skipped: list[str]):
        """The blocks whose token ids are all below the manifest's vocabulary: an id at or above it would
        fail in the embedding (IndexError on the CPU, a device-side assert on a GPU) without naming the
        shard. One max per block read (bench/data.py measures it)."""
        vocab = self.manifest.vocab_size
        try:
            for block in blocks:
                if block.tokens.size and int(block.tokens.max()) >= vocab:
                    problem = (f"{url}: sample {block.key} has token id {int(block.tokens.max())} >= the vocabulary "
                               f"({vocab}, manifest.json)")
                    if self.on_corrupt != "skip":
                        raise CorruptShardError(problem)
                    skipped.append(block.key)
                    continue
                yield block
        finally:
            blocks.close()


def _tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def batches_of_role(role: int, batches: int, workers: int, per_item: int) -> int:
    """How many of the first `batches` micro-batches reader role `role` gave (see TokenStream.__iter__)."""
    full_items, rest = divmod(batches, per_item)
    return len(range(role, full_items, workers)) * per_item + (rest if full_items % workers == role else 0)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent (the rank) ends, however it ends (a SIGKILL, an
    OOM kill): no loader worker is ever left behind reading for nobody. A no-op elsewhere. The signal
    follows the parent's thread that forked this one: the rank iterates its loader on its main thread."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the rank died before the line above: nothing will send the signal
        os._exit(0)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's init: SIGTERM, SIGUSR1 and SIGINT are its rank's to handle. A job-wide
    signal (scancel, a SLURM preemption, a time limit) reaches every process of the job; a worker
    that died of it would fail its rank's next batch while the rank stops cleanly. The worker still
    ends with its rank: the DataLoader shuts it down, or the kernel kills it when its rank is gone
    (die_with_parent), or its rank sends the SIGTERM itself. That last is how Python's exit ends daemon
    processes (terminate, then join): a worker that ignored its own rank's SIGTERM would keep the rank
    from ever exiting. So SIGTERM stays blocked and is read by a thread, which ends the worker when
    the sender is its rank and drops it else.
    The worker was born with all three blocked (start_workers): one that arrives before this runs
    waits, pending, instead of killing the worker through torch's default handling."""
    parent = multiprocessing.parent_process()
    rank = parent.pid if parent is not None else os.getppid()
    die_with_parent(rank)
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # a pending one is dropped here
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGINT})

    def wait_for_the_ranks_sigterm() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != rank:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_the_ranks_sigterm, name="sigterm-from-rank", daemon=True).start()


def start_workers(loader: DataLoader):
    """iter(loader), with the stop signals blocked in this thread while it forks the workers: each is
    born with them blocked and sets its own handling before it takes one (ignore_stop_signals), so no
    window exists where a job-wide SIGTERM kills a worker that is starting. The rank's mask is restored
    after; a signal that came meanwhile is then delivered to the rank's own handler."""
    if loader.num_workers == 0:
        return iter(loader)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class MicroBatches:
    """Iterates a stream through a DataLoader and cuts each item into micro-batches."""

    def __init__(self, stream: TokenStream):
        self.stream = stream
        self.loader = DataLoader(stream, batch_size=None, num_workers=stream.num_workers,
                                 persistent_workers=stream.num_workers > 0,
                                 prefetch_factor=4 if stream.num_workers else None,
                                 worker_init_fn=ignore_stop_signals if stream.num_workers else None)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        K, B = self.stream.batches_per_item, self.stream.micro_batch_size
        skip = self.stream.start_batch % K
        for item in start_workers(self.loader):
            if ERROR_KEY in item:
                raise (CorruptShardError if item["kind"] == CorruptShardError.__name__ else DataError)(item[ERROR_KEY])
            for k in range(skip, K):
                yield {name: v[k * B: (k + 1) * B] for name, v in item.items()}
            skip = 0


def make_loader(stream: TokenStream) -> MicroBatches:
    return MicroBatches(stream)
