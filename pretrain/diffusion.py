"""LLaDA's forward (masking) process and its training loss. Pure torch.

Per sequence, t ~ U(0, 1) and p_mask = (1 - eps) t + eps; each token is replaced by the mask id
independently with probability p_mask. The loss is the cross-entropy on the masked positions,
each weighted by 1 / p_mask, summed and divided by B * L (every token of the batch, masked or not):
an unbiased estimate of the negative ELBO per token (arXiv 2502.09992, Eq. 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MaskConfig:
    schedule: str  # linear (LLaDA's)
    eps: float
    random_length_prob: float  # share of batches cut to a random length


@dataclass
class NoisyBatch:
    input_ids: torch.Tensor  # [B, L] x0 with masked positions replaced by the mask id
    masked: torch.Tensor  # [B, L] bool
    p_mask: torch.Tensor  # [B, 1] the masking probability of each sequence


def mask_probability(t: torch.Tensor, eps: float) -> torch.Tensor:
    """The linear schedule: t in [0, 1] -> p_mask in [eps, 1]; eps keeps the 1/p_mask weight finite."""
    return (1 - eps) * t + eps


def forward_process(x0: torch.Tensor, mask_id: int, eps: float, generator: torch.Generator) -> NoisyBatch:
    B, L = x0.shape
    t = torch.rand(B, generator=generator, device=generator.device).to(x0.device)
    p_mask = mask_probability(t, eps)[:, None]
    masked = torch.rand(B, L, generator=generator, device=generator.device).to(x0.device) < p_mask
    return NoisyBatch(torch.where(masked, mask_id, x0), masked, p_mask)


def diffusion_loss(logits: torch.Tensor, x0: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
    """sum over masked positions of CE(logits, x0) / p_mask, divided by B * L."""
    B, L = x0.shape
    rows = batch.masked
    # Only the masked rows are upcast: at 126k vocab the full logits in fp32 would not fit.
    ce = F.cross_entropy(logits[rows].float(), x0[rows], reduction="none")
    weight = batch.p_mask.expand(B, L)[rows]
    return (ce / weight).sum() / (B * L)


def random_length(x0: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """With probability `prob`, cut the whole batch to a length L' ~ U{1..L} (the paper does this for
    1% of batches so the model also sees short inputs). Seed `generator` identically on every rank
    (from the step) so that all ranks cut the same way."""
    L = x0.shape[1]
    draw = torch.rand(1, generator=generator).item()
    new_len = int(torch.randint(1, L + 1, (1,), generator=generator).item())
    return x0[:, :new_len] if draw < prob else x0
