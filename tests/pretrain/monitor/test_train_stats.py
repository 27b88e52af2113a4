"""The per-t-bucket loss, the accuracy and the window's reduction over ranks, against sums done by hand."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.monitor.train_stats import LogWindow, LossByTime, bucket_names, loss_metrics
from pretrain.objective.diffusion import NoisyBatch, diffusion_loss_and_stats
from tests.conftest import free_port

MASK_ID = 6


def fixed_batch():
    """4 sequences of 5 tokens, vocabulary 7, masked at t = 0.05, 0.15, 0.17, 0.95 (buckets 0, 1, 1, 9 of 10)."""
    x0 = torch.tensor([[1, 2, 3, 4, 5], [0, 1, 2, 3, 4], [5, 4, 3, 2, 1], [2, 2, 0, 0, 1]])
    masked = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    t = torch.tensor([0.05, 0.15, 0.17, 0.95])
    noisy = NoisyBatch(input_ids=torch.where(masked, MASK_ID, x0), masked=masked, p_mask=t[:, None],
                       weight=(1 / t)[:, None], t=t)
    logits = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(0))
    return logits, x0, noisy


def ce_by_hand(logits, x0, b, i) -> float:
    row = logits[b, i].tolist()
    return math.log(sum(math.exp(v) for v in row)) - row[x0[b, i]]


def test_bucket_names():
    assert bucket_names(10) == ["0-0.1", "0.1-0.2", "0.2-0.3", "0.3-0.4", "0.4-0.5", "0.5-0.6", "0.6-0.7", "0.7-0.8",
                                "0.8-0.9", "0.9-1"]
    assert bucket_names(4) == ["0-0.25", "0.25-0.5", "0.5-0.75", "0.75-1"]


@pytest.mark.parametrize("normalize", ["tokens", "masked"])
def test_bucketed_loss_of_a_fixed_batch(normalize):
    logits, x0, noisy = fixed_batch()
    loss, stats = diffusion_loss_and_stats(logits, x0, noisy, normalize)
    by_time = LossByTime(10, torch.device("cpu"))
    by_time.add(stats, seq_len=5)
    out = loss_metrics(by_time.sums, normalize)

    t = noisy.t.tolist()
    ce = {(b, i): ce_by_hand(logits, x0, b, i) for b in range(4) for i in range(5) if noisy.masked[b, i]}
    buckets = {"0-0.1": [0], "0.1-0.2": [1, 2], "0.9-1": [3]}
    for name, seqs in buckets.items():
        pairs = [(b, i) for (b, i) in ce if b in seqs]
        weighted = sum(ce[b, i] / t[b] for b, i in pairs)
        per = 5 * len(seqs) if normalize == "tokens" else len(pairs)
        assert out[f"loss_by_t/{name}"] == pytest.approx(weighted / per, rel=1e-5)
        assert out[f"ce_by_t/{name}"] == pytest.approx(sum(ce[p] for p in pairs) / len(pairs), rel=1e-5)
    # buckets no sequence fell in are left out, not logged as NaN
    assert {k.split("/")[1] for k in out if k.startswith("loss_by_t/")} == set(buckets)
    assert out["masked_ce"] == pytest.approx(sum(ce.values()) / 8, rel=1e-5)
    if normalize == "tokens":  # the buckets' token-weighted mean is the training loss
        mean = sum(out[f"loss_by_t/{n}"] * 5 * len(s) for n, s in buckets.items()) / 20
        assert mean == pytest.approx(loss.item(), rel=1e-5)


def test_masked_token_accuracy():
    logits, x0, noisy = fixed_batch()
    # Make exactly these masked positions predict their original token; the other masked ones predict 6.
    right = [(0, 0), (1, 2), (3, 0)]
    logits = torch.zeros_like(logits)
    logits[..., MASK_ID] = 1.0
    for b, i in right:
        logits[b, i, x0[b, i]] = 5.0
    _, stats = diffusion_loss_and_stats(logits, x0, noisy)
    assert stats.correct.tolist() == [1, 1, 0, 1]
    by_time = LossByTime(10, torch.device("cpu"))
    by_time.add(stats, seq_len=5)
    assert loss_metrics(by_time.sums, "tokens")["masked_acc"] == pytest.approx(3 / 8)


def test_t_at_the_edges_falls_in_the_first_and_last_bucket():
    logits, x0, noisy = fixed_batch()
    _, stats = diffusion_loss_and_stats(logits, x0, noisy)
    stats.t = torch.tensor([0.0, 0.999, 1.0, 0.5])
    by_time = LossByTime(10, torch.device("cpu"))
    by_time.add(stats, seq_len=5)
    assert by_time.sums[0].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 2]  # sequences per bucket


def test_a_sequence_with_a_non_finite_loss_is_left_out():
    logits, x0, noisy = fixed_batch()
    logits[3] = float("nan")  # sequence 3 (bucket 9) blows up; its step would be skipped
    _, stats = diffusion_loss_and_stats(logits, x0, noisy)
    by_time = LossByTime(10, torch.device("cpu"))
    by_time.add(stats, seq_len=5)
    out = loss_metrics(by_time.sums, "tokens")
    assert all(math.isfinite(v) for v in out.values())
    assert "loss_by_t/0.9-1" not in out and "loss_by_t/0-0.1" in out
    assert out["masked_acc"] == pytest.approx(stats.correct[:3].sum().item() / 4)  # 4 masked tokens in 0-2


def _two_ranks(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        logits, x0, noisy = fixed_batch()
        half = slice(2 * rank, 2 * rank + 2)  # rank 0 has sequences 0, 1; rank 1 has 2, 3
        part = NoisyBatch(noisy.input_ids[half], noisy.masked[half], noisy.p_mask[half], noisy.weight[half],
                          t=noisy.t[half])
        loss, stats = diffusion_loss_and_stats(logits[half], x0[half], part)
        window = LogWindow(10, torch.device("cpu"))
        window.add(loss, stats, seq_len=5)
        window.end_step(1.0 + rank)  # rank 1 is the slower one
        results[rank] = window.summarize("tokens", world=2, flops_token=1000, peak=None)
    finally:
        dist.destroy_process_group()


def test_window_is_reduced_over_ranks():
    port = free_port()
    results = mp.Manager().dict()
    # spawn: a process forked from one that has run torch ops can deadlock in its thread pools
    mp.start_processes(_two_ranks, args=(port, results), nprocs=2, start_method="spawn")
    logits, x0, noisy = fixed_batch()
    _, whole = diffusion_loss_and_stats(logits, x0, noisy)
    by_time = LossByTime(10, torch.device("cpu"))
    by_time.add(whole, seq_len=5)
    expected = loss_metrics(by_time.sums, "tokens")
    for rank in range(2):
        out = results[rank]
        for key, value in expected.items():  # the same as one rank holding the whole batch
            assert out[key] == pytest.approx(value, rel=1e-6), key
        assert out["step_time_s"] == pytest.approx(2.0)  # the slowest rank
        assert out["tokens_per_s"] == pytest.approx(20 / 2.0)  # 4 sequences x 5 tokens in 2 s
        assert out["tokens_per_s_per_device"] == pytest.approx(5.0)
        assert out["mem/rss_gb"] > 0.01
