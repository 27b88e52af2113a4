"""Stream packed windows from shards as endless, seeded, resumable micro-batches for one rank.

Every rank reads every shard and keeps every `readers`-th sample (readers = ranks x DataLoader
workers), so each rank has data whatever the shard count and no collective waits on a rank that ran
dry. The stream runs over epochs, reshuffling the shard order and a sample buffer from the seed each
epoch; training ends by steps or tokens, never by the data running out.

Resume is exact: the stream is a pure function of (manifest, seed, rank, world size, workers), so
after `batches` micro-batches a new stream told to start at `batches` yields what the first would
have yielded next. The state records the manifest's fingerprint, so a resume on other data fails.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.shards import DataError, Manifest, decode_sample


class DataStateError(DataError):
    """A saved stream state that does not fit the data or the layout it is loaded into."""


class TokenStream(IterableDataset):
    def __init__(self, directory: str | Path, split: str, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle_buffer: int, num_workers: int = 0):
        self.directory = Path(directory)
        self.manifest = Manifest.load(directory)
        if split not in self.manifest.splits or self.manifest.samples(split) == 0:
            raise DataError(f"{self.directory}/manifest.json has no samples in split {split!r}")
        self.split, self.micro_batch_size = split, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.num_workers = shuffle_buffer, num_workers
        self.start_batch = 0
        readers = world_size * max(num_workers, 1)
        if self.manifest.samples(split) < readers * micro_batch_size:
            raise DataError(f"{self.directory}: split {split!r} has {self.manifest.samples(split)} samples, fewer "
                             f"than one micro-batch of {micro_batch_size} for each of {readers} readers")

    # -- resume state -------------------------------------------------------------------------
    def state_dict(self, batches_consumed: int) -> dict:
        return {"fingerprint": self.manifest.fingerprint(), "split": self.split, "batches": batches_consumed,
                "world_size": self.world_size, "num_workers": self.num_workers, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.manifest.fingerprint():
            raise DataStateError(f"the checkpoint's data state is for other data (fingerprint {state['fingerprint']}) "
                                 f"than {self.directory} (fingerprint {self.manifest.fingerprint()})")
        for key in ("world_size", "num_workers", "seed"):
            if state[key] != getattr(self, key):
                raise DataStateError(f"the checkpoint's data state was saved with {key}={state[key]}, this run has "
                                     f"{key}={getattr(self, key)}; an exact resume needs the same value")
        self.start_batch = int(state["batches"])

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader takes its j-th batch from worker j % workers. Batch n (counted from the start of
        # training) belongs to reader n % workers, so after a resume at start_batch, worker w plays
        # reader (w + start_batch) % workers and skips that reader's batches before start_batch.
        role = (worker + self.start_batch) % workers
        skip = len(range(role, self.start_batch, workers))
        batches = self._batches(self.rank * workers + role, self.world_size * workers)
        for i, batch in enumerate(batches):
            if i >= skip:
                yield batch

    def _batches(self, reader: int, readers: int) -> Iterator[torch.Tensor]:
        pending: list[np.ndarray] = []
        for sample in self._samples(reader, readers):
            pending.append(sample)
            if len(pending) == self.micro_batch_size:
                yield torch.from_numpy(np.stack(pending).astype(np.int64))
                pending = []

    def _samples(self, reader: int, readers: int) -> Iterator[np.ndarray]:
        dtype, seq_len = np.dtype(self.manifest.dtype), self.manifest.seq_len
        shards = [str(self.directory / s.name) for s in self.manifest.splits[self.split]]
        epoch = 0
        while True:
            rng = random.Random(f"{self.seed}/{self.split}/{epoch}/{reader}")
            order = random.Random(f"{self.seed}/{self.split}/{epoch}").sample(shards, len(shards))
            reader_ds = wds.WebDataset(order, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                       empty_check=False)
            buffer: list[np.ndarray] = []
            for i, sample in enumerate(reader_ds):
                if i % readers != reader:
                    continue
                buffer.append(decode_sample(sample, dtype, seq_len))
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            rng.shuffle(buffer)
            yield from buffer
            epoch += 1


def make_loader(stream: TokenStream) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=stream.num_workers,
                      persistent_workers=stream.num_workers > 0)
