"""LLaDA's reverse process (sampling), with the semantics of the published generate.py.

Each prompt is followed by `gen_length` mask tokens. The answer is produced in `gen_length /
block_length` blocks, left to right (semi-autoregressive), each in `steps / blocks` steps; at each
step the model predicts every masked position, and the `k` predictions of the current block that
`remasking` ranks first are kept (low_confidence: the model's probability of its prediction; random:
a random order), k following get_num_transfer_tokens (the block's masks spread evenly over its steps,
the first steps taking one more). Temperature adds Gumbel noise, in float64, to the logits before the
argmax. Classifier-free guidance: logits = u + (cfg_scale + 1) (c - u), u from a pass with the prompt
masked. One difference from the published code, on purpose: the mask token itself is never predicted
(logit -inf).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

REMASKING = ("low_confidence", "random")


class GenerateError(ValueError):
    """Sampling settings or prompts that cannot work."""


def check_settings(gen_length: int, steps: int, block_length: int | None, remasking: str, cfg_scale: float,
                   temperature: float) -> int:
    """The published generate.py's requirements, as one-line errors; returns the block length."""
    block_length = gen_length if block_length is None else block_length
    if gen_length <= 0 or steps <= 0 or block_length <= 0:
        raise GenerateError(f"gen_length={gen_length}, steps={steps}, block_length={block_length} must be positive")
    if gen_length % block_length:
        raise GenerateError(f"gen_length={gen_length} is not divisible by block_length={block_length}")
    blocks = gen_length // block_length
    if steps % blocks:
        raise GenerateError(f"steps={steps} is not divisible by the number of blocks gen_length/block_length={blocks}")
    if remasking not in REMASKING:
        raise GenerateError(f"remasking={remasking!r} is not one of {', '.join(REMASKING)}")
    if cfg_scale < 0 or temperature < 0:
        raise GenerateError(f"cfg_scale={cfg_scale} and temperature={temperature} must be >= 0")
    return block_length


def tokens_per_step(masks: int, steps: int) -> list[int]:
    """How many of `masks` tokens each of `steps` steps reveals: as even as possible, the first steps
    taking the remainder (the published get_num_transfer_tokens, for one sequence)."""
    base, extra = divmod(masks, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def num_transfer_tokens(block_masks: torch.Tensor, steps: int) -> torch.Tensor:
    """block_masks [B, block_length] bool -> [B, steps]: tokens_per_step for each row."""
    return torch.tensor([tokens_per_step(int(n), steps) for n in block_masks.sum(1).tolist()], dtype=torch.long)


@torch.no_grad()
def generate(forward: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, gen_length: int, steps: int,
             mask_id: int, block_length: int | None = None, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: str = "low_confidence", seed: int = 0) -> torch.Tensor:
    """prompt [B, P] -> [B, P + gen_length]. `forward` maps ids [B, L] to logits [B, L, V]. It is called
    exactly `steps` times (with cfg_scale > 0 on a doubled batch), whatever the data: under ZeRO-3 every
    rank gathers parameters at each call, so all ranks must call it equally often."""
    block_length = check_settings(gen_length, steps, block_length, remasking, cfg_scale, temperature)
    device = prompt.device
    generator = torch.Generator(device=device).manual_seed(seed)
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, dtype=prompt.dtype, device=device)], dim=1)
    is_prompt = torch.zeros_like(x, dtype=torch.bool)
    is_prompt[:, :P] = True
    blocks = gen_length // block_length
    steps_per_block = steps // blocks
    for block in range(blocks):
        end = P + (block + 1) * block_length
        reveal_counts = num_transfer_tokens(x[:, end - block_length: end] == mask_id, steps_per_block)
        for step in range(steps_per_block):
            masked = x == mask_id
            if cfg_scale > 0:
                unconditional = torch.where(is_prompt, mask_id, x)
                cond, uncond = forward(torch.cat([x, unconditional])).float().chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = forward(x).float()
            logits[..., mask_id] = float("-inf")
            if temperature > 0:  # Gumbel-max: argmax(logits + T g) samples softmax(logits / T)
                u = torch.rand(logits.shape, generator=generator, device=device, dtype=torch.float64)
                prediction = (logits.double() - temperature * torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
            else:
                prediction = logits.argmax(-1)
            if remasking == "low_confidence":
                score = logits.softmax(-1).gather(-1, prediction.unsqueeze(-1)).squeeze(-1)
            else:
                score = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
            score[:, end:] = float("-inf")  # later blocks wait for their turn
            score = torch.where(masked, score, float("-inf"))
            reveal = torch.zeros_like(masked)
            for b in range(B):
                k = int(reveal_counts[b, step])
                if k:
                    reveal[b, score[b].topk(k).indices] = True
            x = torch.where(reveal, prediction.to(x.dtype), x)
    return x


def cut_completion(ids: list[int], decode: Callable[[list[int]], str], eos_id: int,
                   stops: Sequence[str] = ()) -> tuple[list[int], str, str]:
    """A completion cut at its first EOS, then before the earliest of the `stops` strings (the published
    evaluation's `until`): (ids, text, finish), finish "eos", "stop" or "length" (neither met). With a
    stop, the text ends where it begins, and ids end with the token that completes it (a stop string
    may end inside a token)."""
    finish = "length"
    if eos_id in ids:
        ids, finish = ids[: ids.index(eos_id)], "eos"
    text = decode(ids)
    starts = [text.find(s) for s in stops if s and s in text]
    if starts:
        text = text[: min(starts)]
        k = next(k for k in range(1, len(ids) + 1) if any(s and s in decode(ids[:k]) for s in stops))
        ids, finish = ids[:k], "stop"
    return ids, text, finish
