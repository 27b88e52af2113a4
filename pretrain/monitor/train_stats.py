"""What the loop accumulates between two log lines, and the numbers derived from it.

Everything per micro-batch stays on the device (a few index_adds, no host sync); at log time one
SUM all-reduce carries the sums (loss, tokens, per-t-bucket statistics) and one MAX all-reduce the
per-rank figures where the slowest rank is what counts (time, data wait, memory).

The loss by noise level: sequence b of a micro-batch, masked at time t_b, falls in bucket
floor(t_b * n) of n equal buckets of [0, 1]. Per bucket:
  loss_by_t  = sum of weight x CE / tokens of its sequences (mask.normalize=tokens, the paper's
               per-token loss) or / its masked tokens (normalize=masked): the training loss
               restricted to that noise level, so the token-weighted mean of the buckets is the loss
  ce_by_t    = plain cross-entropy per masked token (no 1/t weight): how well the model predicts
               at that noise level, comparable across schedules
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import psutil
import torch
import torch.distributed as dist

from pretrain.model.flops import mfu
from pretrain.objective.diffusion import SequenceStats

# Rows of the per-bucket sums.
SEQUENCES, TOKENS, MASKED, CE, WEIGHTED, CORRECT = range(6)


def bucket_names(n: int) -> list[str]:
    """"0-0.1", "0.1-0.2", ... "0.9-1" for n = 10: short, and sorted the same as a string and as t."""
    edges = [round(i / n, 4) for i in range(n + 1)]
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


class LossByTime:
    """Per-t-bucket sums over a log window, on the device."""

    def __init__(self, n_buckets: int, device: torch.device):
        self.n = n_buckets
        self.sums = torch.zeros(6, n_buckets, dtype=torch.float64, device=device)

    def add(self, stats: SequenceStats, seq_len: int) -> None:
        bucket = (stats.t * self.n).long().clamp_(0, self.n - 1)
        ones = torch.ones_like(stats.t)
        rows = torch.stack([ones, ones * seq_len, stats.masked, stats.ce_sum, stats.weighted_sum, stats.correct])
        # A sequence with a non-finite loss (its step is skipped) is left out instead of turning the
        # window's sums into NaN; checked on the device, without a sync.
        rows = torch.where(torch.isfinite(rows).all(0), rows, torch.zeros_like(rows))
        self.sums.index_add_(1, bucket, rows.to(self.sums.dtype))


def loss_metrics(sums: torch.Tensor, normalize: str) -> dict[str, float]:
    """Masked-token accuracy and CE over the window, and the loss per t bucket (buckets no sequence
    fell in are left out rather than logged as NaN)."""
    sums = sums.double().cpu()
    masked = sums[MASKED].sum().item()
    out = {}
    if masked > 0:
        out["masked_acc"] = sums[CORRECT].sum().item() / masked
        out["masked_ce"] = sums[CE].sum().item() / masked
    per = sums[TOKENS] if normalize == "tokens" else sums[MASKED]
    names = bucket_names(sums.shape[1])
    out.update({f"loss_by_t/{name}": (sums[WEIGHTED, i] / per[i]).item() for i, name in enumerate(names) if per[i] > 0})
    out.update({f"ce_by_t/{name}": (sums[CE, i] / sums[MASKED, i]).item()
                for i, name in enumerate(names) if sums[MASKED, i] > 0})
    return out


def throughput_metrics(tokens: float, seconds: float, steps: int, world: int, flops_token: int,
                       peak: float | None) -> dict[str, float]:
    """tokens: all ranks' tokens over `seconds` of training steps (the slowest rank's time)."""
    per_device = tokens / seconds / world
    out = {"tokens_per_s": tokens / seconds, "tokens_per_s_per_device": per_device,
           "tflops_per_device": per_device * flops_token / 1e12, "step_time_s": seconds / steps}
    util = mfu(per_device, flops_token, peak)
    if util is not None:  # no peak known (a CPU without cluster.peak_tflops): no MFU rather than a made-up one
        out["mfu"] = util
    return out


def memory_probe(device: torch.device) -> Callable[[], dict[str, float]]:
    """Chosen once: peak allocated/reserved device memory since the last call on CUDA, the process's
    resident memory elsewhere. GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        def cuda_memory() -> dict[str, float]:
            out = {"mem/peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                   "mem/peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
            torch.cuda.reset_peak_memory_stats(device)
            return out
        return cuda_memory
    process = psutil.Process()
    return lambda: {"mem/rss_gb": process.memory_info().rss / 2**30}


class LogWindow:
    """The training since the last log line: the loss and its statistics on the device, the time in
    optimizer steps and the part of it spent waiting for the data loader, on the host."""

    def __init__(self, n_buckets: int, device: torch.device):
        self.n_buckets, self.device = n_buckets, torch.device(device)
        self.memory = memory_probe(device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.micro_batches, self.tokens, self.steps = 0, 0, 0
        self.step_seconds, self.data_seconds = 0.0, 0.0
        self.by_time = LossByTime(self.n_buckets, self.device)

    def next_batch(self, batches: Iterator[dict]) -> dict:
        start = time.perf_counter()
        batch = next(batches)
        self.data_seconds += time.perf_counter() - start
        return batch

    def add(self, loss: torch.Tensor, stats: SequenceStats, seq_len: int) -> None:
        self.loss_sum += loss.detach()
        self.micro_batches += 1
        self.tokens += stats.t.numel() * seq_len
        self.by_time.add(stats, seq_len)

    def end_step(self, seconds: float) -> None:
        self.steps += 1
        self.step_seconds += seconds

    def summarize(self, normalize: str, world: int, flops_token: int, peak: float | None,
                  copies: int = 1) -> dict[str, float]:
        """The window's metrics, the same on every rank (a collective: every rank must call it). `copies`:
        how many ranks added each sequence (a sequence-parallel group's N, each with the group's sums)."""
        counts = torch.tensor([self.micro_batches, self.tokens], dtype=torch.float64, device=self.device)
        summed = torch.cat([self.loss_sum[None], counts, self.by_time.sums.flatten()])
        dist.all_reduce(summed)
        memory = self.memory()
        slowest = torch.tensor([self.step_seconds, self.data_seconds / max(self.step_seconds, 1e-9),
                                *memory.values()], dtype=torch.float64, device=self.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        loss_sum, micro_batches, tokens = summed[:3].tolist()
        seconds, data_share, *peak_memory = slowest.tolist()
        return {"loss": loss_sum / micro_batches,
                **loss_metrics(summed[3:].view(6, self.n_buckets), normalize),
                **throughput_metrics(tokens / copies, max(seconds, 1e-9), self.steps, world, flops_token, peak),
                "data_wait_share": data_share, **dict(zip(memory, peak_memory, strict=True))}


def device_name(device: torch.device) -> str:
    """What the peak-TFLOP/s table is matched against: the CUDA device's name, else the device type."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
