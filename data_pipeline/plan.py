"""Which windows each reader reads: positions in an endless sequence of shard visits.

Epoch e visits every shard of a split once, in an order drawn from (seed, split, e); visit g is the
(g mod S)-th shard of epoch g // S's order (S shards). Within a visit, windows are read in an order
shuffled within consecutive chunks of `shuffle_buffer` windows, so a reader holds one chunk at a
time. A position (g, k) is the k-th window read in visit g.

A Plan gives reader r (of `readers`) first its `prefix` ranges, then the visits origin + r,
origin + r + readers, ... The sequence never ends, so every reader always has data, and a reader
only opens the shards of its own visits. Everything here is integers: which windows a reader has
consumed follows from how many it consumed, without reading any data. That is what makes resume
exact, and `replan` elastic: given what each reader of a finished layout consumed, it hands the
unread positions below a frontier to the new readers as prefixes, then continues round-robin from
the frontier, so no position is read twice and none is skipped.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

Range = tuple[int, int, int]  # visit g, positions [k0, k1)


class Visits:
    """The shard of each visit and its size, for one split's shards in manifest order."""

    def __init__(self, sizes: list[int], seed: int, split: str):
        self.sizes, self.seed, self.split = sizes, seed, split
        self.first_id = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)  # global window id

    @lru_cache(maxsize=8)  # noqa: B019 (one Visits per stream; a few epochs in use at once)
    def order(self, epoch: int) -> list[int]:
        return random.Random(f"{self.seed}/{self.split}/{epoch}").sample(range(len(self.sizes)), len(self.sizes))

    def shard(self, g: int) -> int:
        return self.order(g // len(self.sizes))[g % len(self.sizes)]

    def size(self, g: int) -> int:
        return self.sizes[self.shard(g)]

    def epoch(self, g: int) -> int:
        return g // len(self.sizes)

    def chunk_order(self, g: int, chunk: int, n: int) -> np.ndarray:
        """The order in which the n windows of one chunk of visit g are read."""
        return np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), g, chunk]).permutation(n)


@dataclass
class Plan:
    readers: int
    origin: int = 0
    prefix: list[list[list[int]]] = field(default_factory=list)  # per reader: [g, k0, k1] ranges

    def ranges(self, reader: int, visits: Visits) -> Iterator[Range]:
        for g, k0, k1 in self.prefix[reader] if self.prefix else []:
            yield g, k0, k1
        g = self.origin + reader
        while True:
            yield g, 0, visits.size(g)
            g += self.readers

    def ranges_after(self, reader: int, consumed: int, visits: Visits) -> Iterator[Range]:
        """The reader's ranges with its first `consumed` windows removed."""
        for g, k0, k1 in self.ranges(reader, visits):
            if consumed >= k1 - k0:
                consumed -= k1 - k0
                continue
            yield g, k0 + consumed, k1
            consumed = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Plan:
        return Plan(d["readers"], d["origin"], d["prefix"])


def replan(plan: Plan, consumed: list[int], readers: int, visits: Visits) -> Plan:
    """A plan for `readers` new readers that reads exactly the positions `plan`'s readers had not
    consumed (reader r consumed its first consumed[r] windows), each once."""
    holes: list[Range] = []
    frontier = plan.origin
    nexts = []
    for r, count in enumerate(consumed):
        it = plan.ranges_after(r, count, visits)
        g, k0, k1 = next(it)
        while g < plan.origin:  # the unread rest of the prefix (all of it lies below the origin)
            holes.append((g, k0, k1))
            g, k0, k1 = next(it)
        nexts.append((r, (g, k0, k1), it))
        # Visits before g that belong to r were read whole; visit g up to k0.
        frontier = max(frontier, g + 1 if k0 > 0 else g)
    for _, (g, k0, k1), it in nexts:
        while g < frontier:
            holes.append((g, k0, k1))
            g, k0, k1 = next(it)
    holes.sort()
    return Plan(readers, frontier, _split_evenly(holes, readers))


def _split_evenly(holes: list[Range], readers: int) -> list[list[list[int]]]:
    """Consecutive shares of the holes' positions, as equal as integers allow."""
    total = sum(k1 - k0 for _, k0, k1 in holes)
    bounds = [total * i // readers for i in range(readers + 1)]
    out: list[list[list[int]]] = [[] for _ in range(readers)]
    pos, reader = 0, 0
    for g, k0, k1 in holes:
        while k0 < k1:
            while pos >= bounds[reader + 1]:
                reader += 1
            take = min(k1 - k0, bounds[reader + 1] - pos)
            out[reader].append([g, k0, k0 + take])
            k0, pos = k0 + take, pos + take
    return out
