"""Sampling by iterative unmasking with low-confidence remasking (LLaDA's reverse process, without
semi-autoregressive blocks or guidance).

Start from the prompt followed by `gen_length` mask tokens. At each of `steps` steps, predict every
masked position, then reveal the ones the model is most confident about; the number revealed per
step is spread evenly (the linear schedule), so all are revealed after the last step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tokens_per_step(gen_length: int, steps: int) -> list[int]:
    base, extra = divmod(gen_length, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


@torch.no_grad()
def generate(forward: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, gen_length: int,
             steps: int, mask_id: int, temperature: float = 0.0, seed: int = 0) -> torch.Tensor:
    """prompt [B, P] -> [B, P + gen_length]. `forward` maps ids [B, L] to logits [B, L, V]; under
    ZeRO-3 every rank must call it the same number of times, since each forward gathers parameters.
    temperature 0 predicts the argmax; above 0 it samples (Gumbel-max), and confidence is still the
    model's probability of the chosen token."""
    generator = torch.Generator().manual_seed(seed)
    steps = max(1, min(steps, gen_length))
    B = prompt.shape[0]
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, dtype=prompt.dtype, device=prompt.device)], dim=1)
    for k in tokens_per_step(gen_length, steps):
        masked = x == mask_id
        logits = forward(x).float()
        logits[..., mask_id] = float("-inf")  # never "predict" the mask itself
        probs = logits.softmax(-1)
        if temperature > 0:
            gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator).clamp_min(1e-20)))
            prediction = (logits / temperature + gumbel.to(logits.device)).argmax(-1)
        else:
            prediction = logits.argmax(-1)
        confidence = probs.gather(-1, prediction.unsqueeze(-1)).squeeze(-1)
        confidence = torch.where(masked, confidence, float("-inf"))
        reveal = torch.zeros_like(masked)
        reveal.scatter_(1, confidence.topk(k, dim=1).indices, True)
        x = torch.where(reveal & masked, prediction, x)
    return x
