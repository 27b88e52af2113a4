"""Noise draws that do not depend on the layout, and complementary masks. Pure torch.

Keyed draws: the uniforms that decide which tokens a sequence masks come from a generator seeded by
(seed, step, the sequence's index in the global batch), so data-parallel layouts (1 rank x 2
micro-batches, 2 ranks x 1) and resumes draw the same masks for the same sequence. The times are
drawn for the whole global batch from a generator seeded by the step (diffusion.sample_times), so
they are keyed the same way.

Complementary masking (LLaDA 2.0's SFT; `mask.complementary=true`): each sequence is trained twice in
the same micro-batch, with its mask m and with its complement, the maskable positions m leaves
visible. Per block (or per sequence) of masking probability p, the complement's probability is
1 - p: its time is t' = schedule.time_of(1 - p) (linear: t' = 1 - t) and its masked tokens weigh the
ELBO weight at t' (linear: 1 / (1 - t)); with block.weight=none both weigh 1. Each copy is an
unbiased estimate of the same bound when t is drawn on [0, 1] (t' is then uniform too), so the pair's
mean is one, normalised over both copies (B * L counts 2B sequences). With a band [lo, hi] on t the
complement lies in [1 - hi, 1 - lo] (dFactory's 0.3-0.8 gives 0.2-0.7): a band is a biased,
lower-variance objective either way. t' is clamped to [eps, 1]: its weight stays finite.
"""

from __future__ import annotations

import torch

from pretrain.objective.diffusion import NoisyBatch, Schedule


def keyed_uniforms(seeds: list[int], length: int) -> torch.Tensor:
    """[len(seeds), length] uniforms, row b from its own generator seeded by seeds[b]."""
    return torch.stack([torch.rand(length, generator=torch.Generator().manual_seed(s)) for s in seeds])


def complement(noisy: NoisyBatch, x0: torch.Tensor, mask_id: int, schedule: Schedule, eps: float,
               elbo_weight: bool = True) -> tuple[torch.Tensor, NoisyBatch]:
    """(x0, noisy) -> (x0 twice, the batch followed by its complements): 2B sequences."""
    B, L = x0.shape
    maskable = torch.ones_like(noisy.masked)
    if noisy.response_len is not None:  # the conditional form: the prompt stays visible in both copies
        maskable = torch.arange(L, device=x0.device)[None, :] >= (L - noisy.response_len).long()
    masked = maskable & ~noisy.masked
    p = (1 - noisy.p_mask.double()).clamp(0, 1)
    t = schedule.time_of(p).clamp(eps, 1.0)
    weight = schedule.weight(t).float() if elbo_weight else torch.ones_like(noisy.weight)
    t_seq = t.mean(dim=1).float()
    other = NoisyBatch(torch.where(masked, mask_id, x0), masked, p.float(), weight.to(noisy.weight.dtype),
                       noisy.response_len, t_seq)
    cat = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
    both = NoisyBatch(torch.cat([noisy.input_ids, other.input_ids]), torch.cat([noisy.masked, other.masked]),
                      cat(noisy.p_mask, other.p_mask), cat(noisy.weight, other.weight),
                      cat(noisy.response_len, other.response_len), cat(noisy.t, other.t))
    return torch.cat([x0, x0]), both
