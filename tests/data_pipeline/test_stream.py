import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline.build import build
from data_pipeline.stream import DataStateError, TokenStream, make_loader
from tests.conftest import demo_data_config


def stream(directory, rank=0, world=2, workers=0, seed=0, batch=4, split="train"):
    return TokenStream(directory, split, micro_batch_size=batch, rank=rank, world_size=world, seed=seed,
                       shuffle_buffer=32, num_workers=workers)


def take(s, n):
    return list(itertools.islice(make_loader(s), n))


def rows(batches):
    return [tuple(r.tolist()) for b in batches for r in b]


def all_windows(directory) -> Counter:
    """Every training window once (as a multiset: the demo text repeats some 64-token windows)."""
    s = stream(directory, world=1, batch=1)
    return Counter(rows(take(s, s.manifest.samples("train"))))


def test_ranks_split_each_epoch_without_overlap(demo_shards):
    s0, s1 = stream(demo_shards, rank=0), stream(demo_shards, rank=1)
    n = s0.manifest.samples("train")
    per_rank = n // 2 // 4  # whole batches per rank per epoch
    a, b = Counter(rows(take(s0, per_rank))), Counter(rows(take(s1, per_rank)))
    everything = all_windows(demo_shards)
    assert a + b <= everything  # no window read by both ranks (more often than it occurs)
    assert (a + b).total() == 2 * per_rank * 4 >= n - 8  # all but the remainder that fills no batch


def test_stream_runs_over_epochs_and_reshuffles(demo_shards):
    s = stream(demo_shards, world=1, batch=1)
    n = s.manifest.samples("train")
    samples = rows(take(s, 2 * n))
    epoch0, epoch1 = samples[:n], samples[n:]
    assert len(epoch1) == n  # did not stop after one epoch
    assert epoch0 != epoch1
    assert Counter(epoch0) == Counter(epoch1) == all_windows(demo_shards)


def test_seed_changes_the_order(demo_shards):
    assert rows(take(stream(demo_shards, seed=0), 3)) != rows(take(stream(demo_shards, seed=1), 3))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("start", [7, 40])
def test_resume_yields_exactly_the_uninterrupted_batches(demo_shards, workers, start):
    for rank in (0, 1):
        full = take(stream(demo_shards, rank=rank, workers=workers), start + 12)
        resumed = stream(demo_shards, rank=rank, workers=workers)
        resumed.load_state_dict(stream(demo_shards, rank=rank, workers=workers).state_dict(start))
        for expected, got in zip(full[start:], take(resumed, 12), strict=True):
            assert torch.equal(expected, got)


def test_resume_on_other_data_fails(demo_shards, tmp_path):
    build(demo_data_config(tmp_path / "other", heldout_fraction=0.2))
    state = stream(demo_shards).state_dict(5)
    with pytest.raises(DataStateError, match="other data"):
        stream(tmp_path / "other").load_state_dict(state)


def test_resume_with_another_layout_fails(demo_shards):
    state = stream(demo_shards, world=2).state_dict(5)
    with pytest.raises(DataStateError, match="world_size=2, this run has world_size=4"):
        stream(demo_shards, world=4).load_state_dict(state)


def test_batches_are_int64_windows(demo_shards):
    batch = take(stream(demo_shards), 1)[0]
    assert batch.dtype == torch.int64 and batch.shape == (4, 64)
    assert batch.max().item() < 1024 and np.all(batch.numpy() >= 0)
