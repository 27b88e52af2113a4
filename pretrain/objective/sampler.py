"""LLaDA's reverse process (sampling), with the semantics of the published generate.py, and the fast
options of Fast-dLLM (Wu et al., arXiv 2505.22618) and LLaDA 2.0.

Each prompt is followed by `gen_length` mask tokens. The answer is produced in `gen_length /
block_length` blocks, left to right (semi-autoregressive), each in `steps / blocks` steps; at each
step the model predicts every masked position, and the `k` predictions of the current block that
`remasking` ranks first are kept (low_confidence: the model's probability of its prediction; random:
a random order), k following get_num_transfer_tokens (the block's masks spread evenly over its steps,
the first steps taking one more). Temperature adds Gumbel noise, in float64, to the logits before the
argmax. Classifier-free guidance: logits = u + (cfg_scale + 1) (c - u), u from a pass with the prompt
masked. One difference from the published code, on purpose: the mask token itself is never predicted
(logit -inf).

Parallel decoding (low_confidence only): with `threshold`, a step keeps every masked token of the block
whose probability is at or above it (Fast-dLLM, LLaDA 2.0); with `factor`, the n most confident while
the n-th has probability >= 1 - factor / (n + 1) (Fast-dLLM's factor rule). Either way a step keeps at
least the schedule's share of what is left (ceil(masks left / steps left), so at least one), which
makes `steps` a cap: a block takes at most steps / blocks passes, and ends as soon as it has no mask
(a threshold above every probability gives the scheduled sampler). Unset: the scheduled sampler.

`cache` (pretrain/model/kv_cache.py: "prefix" or "dual", a KVCache) runs the model at a block's later
steps on a window only; mask tokens inside the prompt are then left as they are. `prompt_mask` [B, P]
(False on left padding) keeps padding out of attention. Random draws (temperature, random remasking)
are made for the whole sequence and cut to the window, so a cache changes no draw.

Block diffusion models (`generate_blocks`, `generate_block_rows`) are sampled block by block, at their
blocks' absolute positions, with the same options; their cache ("block", a BlockKVCache) is exact.

This file imports only torch: every export ships it as sampling_llada.py (pretrain/hf/modeling/).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

REMASKING = ("low_confidence", "random")


class GenerateError(ValueError):
    """Sampling settings or prompts that cannot work."""


def check_settings(gen_length: int, steps: int, block_length: int | None, remasking: str, cfg_scale: float,
                   temperature: float, threshold: float | None = None, factor: float | None = None) -> int:
    """The published generate.py's requirements, and the fast options', as one-line errors; returns the
    block length."""
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
    if threshold is not None and factor is not None:
        raise GenerateError(f"threshold={threshold} and factor={factor}: set one of them (or neither)")
    if threshold is not None and not 0 < threshold <= 1:
        raise GenerateError(f"threshold={threshold} must be in (0, 1] (or null: the scheduled sampler)")
    if factor is not None and not factor > 0:
        raise GenerateError(f"factor={factor} must be > 0 (or null)")
    if (threshold is not None or factor is not None) and remasking != "low_confidence":
        raise GenerateError(f"threshold and factor compare the model's probabilities: remasking={remasking!r} "
                            "has none, use low_confidence")
    return block_length


def tokens_per_step(masks: int, steps: int) -> list[int]:
    """How many of `masks` tokens each of `steps` steps reveals: as even as possible, the first steps
    taking the remainder (the published get_num_transfer_tokens, for one sequence)."""
    base, extra = divmod(masks, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def num_transfer_tokens(block_masks: torch.Tensor, steps: int) -> torch.Tensor:
    """block_masks [B, block_length] bool -> [B, steps]: tokens_per_step for each row."""
    return torch.tensor([tokens_per_step(int(n), steps) for n in block_masks.sum(1).tolist()], dtype=torch.long)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token lists -> ids [B, P] left-padded with pad_id, and the prompt mask [B, P] (False on padding;
    None when no row is padded, so an unpadded batch runs exactly as before)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
    return ids, None if bool(mask.all()) else mask


def adaptive_counts(confidence: torch.Tensor, threshold: float | None, factor: float | None) -> torch.Tensor:
    """confidence [B, W] (-inf where nothing may be revealed) -> [B]: how many the rule keeps."""
    ranked = confidence.sort(dim=-1, descending=True).values
    if threshold is not None:
        return (ranked >= threshold).sum(-1)
    n = torch.arange(1, ranked.shape[-1] + 1, device=ranked.device, dtype=ranked.dtype)
    return (ranked >= 1 - factor / (n + 1)).long().cumprod(-1).sum(-1)


@torch.no_grad()
def generate(forward: Callable[..., torch.Tensor], prompt: torch.Tensor, gen_length: int, steps: int,
             mask_id: int, block_length: int | None = None, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: str = "low_confidence", seed: int = 0, threshold: float | None = None,
             factor: float | None = None, prompt_mask: torch.Tensor | None = None, cache=None,
             all_done: Callable[[bool], bool] | None = None) -> torch.Tensor:
    """prompt [B, P] -> [B, P + gen_length]. `forward` maps ids [B, L] to logits [B, L, V] (with
    `attention_mask=` [B, L] when prompt_mask is given, `cache=` with a cache). Without threshold and
    factor it is called exactly `steps` times (with cfg_scale > 0 on a doubled batch), whatever the
    data. With them a block ends when it has no mask: under ZeRO-3 every rank gathers parameters at each
    call, so all ranks must agree on that; `all_done(done here) -> done on every rank` does it."""
    block_length = check_settings(gen_length, steps, block_length, remasking, cfg_scale, temperature, threshold,
                                  factor)
    adaptive = threshold is not None or factor is not None
    device = prompt.device
    generator = torch.Generator(device=device).manual_seed(seed)
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), mask_id, dtype=prompt.dtype, device=device)], dim=1)
    L = x.shape[1]
    keep = None
    if prompt_mask is not None:
        keep = torch.cat([prompt_mask.to(device=device, dtype=torch.bool),
                          torch.ones(B, gen_length, dtype=torch.bool, device=device)], dim=1)
    is_prompt = torch.zeros_like(x, dtype=torch.bool)
    is_prompt[:, :P] = True
    blocks = gen_length // block_length
    steps_per_block = steps // blocks
    for block in range(blocks):
        start, end = P + block * block_length, P + (block + 1) * block_length
        reveal_counts = num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        for step in range(steps_per_block):
            if adaptive:
                done = not bool((x[:, start:end] == mask_id).any())
                if all_done(done) if all_done is not None else done:
                    break
            lo, hi = 0, L
            if cache is not None:
                lo, hi = cache.reset(L) if step == 0 else cache.window(start, end)
            ids = x if cfg_scale == 0 else torch.cat([x, torch.where(is_prompt, mask_id, x)])
            kwargs = {}
            if keep is not None:
                kwargs["attention_mask"] = keep if cfg_scale == 0 else torch.cat([keep, keep])
            if cache is not None:
                kwargs["cache"] = cache
            logits = forward(ids[:, lo:hi], **kwargs).float()
            if cfg_scale > 0:
                cond, uncond = logits.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            logits[..., mask_id] = float("-inf")
            if temperature > 0:  # Gumbel-max: argmax(logits + T g) samples softmax(logits / T)
                # drawn for the whole sequence and cut to the window: a cache changes no draw
                u = torch.rand((B, L, logits.shape[-1]), generator=generator, device=device, dtype=torch.float64)
                u = u[:, lo:hi]
                prediction = (logits.double() - temperature * torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
            else:
                prediction = logits.argmax(-1)
            window = x[:, lo:hi]
            if remasking == "low_confidence":
                score = logits.softmax(-1).gather(-1, prediction.unsqueeze(-1)).squeeze(-1)
            else:
                score = torch.rand((B, L), generator=generator, device=device, dtype=torch.float64)[:, lo:hi]
            score[:, end - lo:] = float("-inf")  # later blocks wait for their turn
            score = torch.where(window == mask_id, score, float("-inf"))
            if adaptive:  # the rule's count, at least the schedule's share of what is left
                left = (x[:, start:end] == mask_id).sum(-1).cpu()
                floor = (left + steps_per_block - step - 1) // (steps_per_block - step)
                counts = torch.minimum(torch.maximum(floor, adaptive_counts(score, threshold, factor).cpu()), left)
            else:
                counts = reveal_counts[:, step]
            reveal = torch.zeros_like(window, dtype=torch.bool)
            for b in range(B):
                k = int(counts[b])
                if k:
                    reveal[b, score[b].topk(k).indices] = True
            x[:, lo:hi] = torch.where(reveal, prediction.to(x.dtype), window)
    return x


def pieces(prompt_len: int, gen_length: int, block_size: int) -> list[int]:
    """The lengths a block model decodes one after another: to the end of the prompt's block, then whole
    blocks (the last one cut at prompt_len + gen_length)."""
    out, pos, end = [], prompt_len, prompt_len + gen_length
    while pos < end:
        stop = min((pos // block_size + 1) * block_size, end)
        out.append(stop - pos)
        pos = stop
    return out


@torch.no_grad()
def generate_blocks(model, prompt: torch.Tensor, gen_length: int, steps: int, mask_id: int, block_size: int,
                    temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
                    seed: int = 0, threshold: float | None = None, factor: float | None = None, cache=None,
                    all_done: Callable[[bool], bool] | None = None) -> torch.Tensor:
    """A block diffusion model: prompt [B, P] -> [B, P + gen_length]. Blocks sit at absolute positions
    (0..B-1, B..2B-1, ...), as in training. A prompt that ends inside a block leaves that block partly
    clean: its first piece is the block's remaining positions, decoded with the prompt's tokens of that
    block visible; every later piece is a whole block. Each piece is decoded by `generate` over the
    sequence so far, as its prompt, under block-causal attention (`model(ids, block_size=)`), so a block
    not yet begun could not change it. The steps are shared out over the pieces as evenly as possible
    (the first take the remainder): the model is called `steps` times in all (at most, with a
    `threshold` or `factor`). `cache`: a BlockKVCache (kv_cache.py), kept across the pieces."""
    lengths = pieces(prompt.shape[1], gen_length, block_size)
    if steps < len(lengths):
        raise GenerateError(f"steps={steps} is fewer than the {len(lengths)} blocks to decode "
                            f"(block size {block_size})")
    base, extra = divmod(steps, len(lengths))

    def forward(ids, **kwargs):
        return model(ids, block_size=block_size, **kwargs)

    x = prompt
    for i, n in enumerate(lengths):
        x = generate(forward, x, n, base + (1 if i < extra else 0), mask_id, None, temperature, cfg_scale,
                     remasking, seed + i, threshold, factor, None, cache, all_done)
    return x


def generate_block_rows(model, padded: torch.Tensor, prompt_mask: torch.Tensor | None, gen_length: int, steps: int,
                        mask_id: int, block_size: int, temperature: float = 0.0, cfg_scale: float = 0.0,
                        remasking: str = "low_confidence", seed: int = 0, threshold: float | None = None,
                        factor: float | None = None, new_cache: Callable[[], object] | None = None,
                        all_done: Callable[[bool], bool] | None = None) -> torch.Tensor:
    """A left-padded batch [B, W] (prompt_mask [B, W]: True on prompt tokens; None: none padded) ->
    [B, W + gen_length], each row decoded alone by `generate_blocks` (a block model's blocks sit at
    absolute positions, which padding would move), with a fresh cache from `new_cache()` if given. So a
    row gives what its prompt gives alone."""
    rows = []
    if prompt_mask is None:
        prompt_mask = torch.ones_like(padded, dtype=torch.bool)
    for row, keep in zip(padded, prompt_mask.bool(), strict=True):
        x = generate_blocks(model, row[keep][None], gen_length, steps, mask_id, block_size, temperature, cfg_scale,
                            remasking, seed, threshold, factor, None if new_cache is None else new_cache(), all_done)
        rows.append(x[0, -gen_length:])
    return torch.cat([padded, torch.stack(rows)], dim=1)


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
