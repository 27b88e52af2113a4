"""From causal to bidirectional attention: DiffuLLaMA's attention-mask annealing (Gong et al., 2024,
"Scaling Diffusion Language Models via Adaptation from Autoregressive Models", arXiv 2410.17891).

A model warm-started from an autoregressive one has only ever attended to the past. With
`model.attention_anneal_steps=N`, training step s uses the causal mask with each future position
(above the diagonal) also opened with probability s / N, drawn afresh each step; from step N on the
attention is fully bidirectional, LLaDA's. N = 0 (the default) is bidirectional from the first step,
as Dream and LLaDA 2.0 do. The draw is seeded by the step alone, so every rank and every resume sees
the same mask. The loss is unchanged (the masked tokens' cross-entropy); only what each position may
see changes. Evaluation and sampling outside a training run see the whole sequence.
"""

from __future__ import annotations

import torch


def open_ratio(step: int, anneal_steps: int) -> float:
    """The share of future positions each position may attend to at this step (1: bidirectional)."""
    if anneal_steps <= 0:
        return 1.0
    return min(1.0, max(0, step) / anneal_steps)


def annealed_mask(seq_len: int, step: int, anneal_steps: int, device=None) -> torch.Tensor | None:
    """[L, L] bool (True = may attend) at this training step; None once fully bidirectional."""
    ratio = open_ratio(step, anneal_steps)
    if ratio >= 1.0:
        return None
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    g = torch.Generator().manual_seed(0x5EED_A11EA1 + step)
    opened = torch.rand(seq_len, seq_len, generator=g) < ratio
    return (causal | opened).to(device)


def anneal_beyond_end(anneal_steps: int, last_step: int) -> str | None:
    """A warning when the run ends before its attention is fully open: its last steps trained with a
    partly causal mask, but evaluate, generate and an export see the whole sequence."""
    if anneal_steps <= last_step:
        return None
    return (f"model.attention_anneal_steps={anneal_steps} is beyond the run's last step ({last_step}): it ends "
            f"with {open_ratio(last_step, anneal_steps):.0%} of the future positions open, while evaluate, "
            f"generate and an export attend to the whole sequence; lower it or train longer")
