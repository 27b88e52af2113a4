"""Sampling from a block diffusion model, without a cache (each step recomputes the
prefix; the KV cache is the fast-sampling work). Pure torch.

Blocks sit at absolute positions (0..B-1, B..2B-1, ...), as in training. A prompt of P tokens that
ends inside a block leaves that block partly clean: its first decoded piece is the block's remaining
B - (P mod B) positions, decoded with the prompt's tokens of that block visible (training's noisy
blocks also hold unmasked tokens); every later piece is a whole block, the last one cut at P +
gen_length. Each piece is decoded by LLaDA's sampler (objective/sampler.py) over the sequence so far
under block-causal attention, so later (not yet existing) blocks could not change it anyway. The
steps are shared out over the pieces as evenly as possible (the first pieces take the remainder).

"""

from __future__ import annotations

import torch

from pretrain.objective.sampler import GenerateError, generate


def pieces(prompt_len: int, gen_length: int, block_size: int) -> list[int]:
    """The lengths decoded one after another: to the end of the prompt's block, then whole blocks."""
    out, pos, end = [], prompt_len, prompt_len + gen_length
    while pos < end:
        stop = min((pos // block_size + 1) * block_size, end)
        out.append(stop - pos)
        pos = stop
    return out


def block_forward(model, block_size: int):
    """ids -> logits under block-causal attention (a LLaDAModel or a DeepSpeed engine around one)."""
    return lambda ids: model(ids, block_size=block_size)


@torch.no_grad()
def generate_blocks(model, prompt: torch.Tensor, gen_length: int, steps: int, mask_id: int, block_size: int,
                    temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
                    seed: int = 0, threshold: float | None = None, factor: float | None = None) -> torch.Tensor:
    """prompt [B, P] -> [B, P + gen_length], block by block. Calls the model `steps` times in all (at most,
    with a `threshold` or `factor`: objective/sampler.py's parallel decoding within each piece)."""
    lengths = pieces(prompt.shape[1], gen_length, block_size)
    if steps < len(lengths):
        raise GenerateError(f"steps={steps} is fewer than the {len(lengths)} blocks to decode "
                            f"(block size {block_size})")
    base, extra = divmod(steps, len(lengths))
    forward, x = block_forward(model, block_size), prompt
    for i, n in enumerate(lengths):
        x = generate(forward, x, n, base + (1 if i < extra else 0), mask_id, None, temperature, cfg_scale,
                     remasking, seed + i, threshold, factor)
    return x


def generate_block_rows(model, padded: torch.Tensor, prompt_mask: torch.Tensor | None, gen_length: int, steps: int,
                        mask_id: int, block_size: int, temperature: float = 0.0, cfg_scale: float = 0.0,
                        remasking: str = "low_confidence", seed: int = 0, threshold: float | None = None,
                        factor: float | None = None) -> torch.Tensor:
    """A left-padded batch [B, W] (prompt_mask [B, W]: 1 = a prompt token; None: none padded) -> [B, W + gen_length], each
    row decoded alone: a block model's blocks sit at absolute positions, which padding would move. So a
    row gives what its prompt gives alone; the model is called `steps` times per row."""
    rows = []
    if prompt_mask is None:  # left_pad's "no row is padded"
        prompt_mask = torch.ones_like(padded, dtype=torch.bool)
    for row, keep in zip(padded, prompt_mask.bool(), strict=True):
        x = generate_blocks(model, row[keep][None], gen_length, steps, mask_id, block_size, temperature, cfg_scale,
                            remasking, seed, threshold, factor)
        rows.append(x[0, -gen_length:])
    return torch.cat([padded, torch.stack(rows)], dim=1)
