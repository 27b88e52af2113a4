"""The fast sampling options (pretrain/objective/sampler.py, pretrain/model/kv_cache.py) on small random
models in fp32: unset, they give the published sampler's tokens (a copy of the implementation they
replaced, below); a threshold keeps what it should; the caches compute what the full pass computes;
left padding with a mask gives each prompt what it gets alone; two ranks in step under gloo."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.hf.format import model_config
from pretrain.model.kv_cache import BlockKVCache, KVCache, make_cache
from pretrain.model.transformer import LLaDAModel
from pretrain.objective.sampler import (
    GenerateError,
    generate,
    generate_block_rows,
    generate_blocks,
    left_pad,
    num_transfer_tokens,
)
from tests.conftest import free_port

MASK = 0
VOCAB = 61


def small_model(seed: int = 0, **changes) -> LLaDAModel:
    """Random weights, large enough (init_std) that the model is confident about some positions."""
    fields = dict(name="t", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_hidden_size=96, vocab_size=VOCAB,
                  max_sequence_length=128, rope_theta=10000.0, rms_norm_eps=1e-5, init_std=0.3, attention="sdpa",
                  document_mask=False, init_from=None)
    torch.manual_seed(seed)
    return LLaDAModel(model_config({**fields, **changes})).eval()


@torch.no_grad()
def published_generate(forward, prompt, gen_length, steps, mask_id, block_length=None, temperature=0.0,
                       cfg_scale=0.0, remasking="low_confidence", seed=0):
    """The sampler as it was before the fast options (commit ba077b7), verbatim but for the checks."""
    block_length = block_length or gen_length
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
            if temperature > 0:
                u = torch.rand(logits.shape, generator=generator, device=device, dtype=torch.float64)
                prediction = (logits.double() - temperature * torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)
            else:
                prediction = logits.argmax(-1)
            if remasking == "low_confidence":
                score = logits.softmax(-1).gather(-1, prediction.unsqueeze(-1)).squeeze(-1)
            else:
                score = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
            score[:, end:] = float("-inf")
            score = torch.where(masked, score, float("-inf"))
            reveal = torch.zeros_like(masked)
            for b in range(B):
                k = int(reveal_counts[b, step])
                if k:
                    reveal[b, score[b].topk(k).indices] = True
            x = torch.where(reveal, prediction.to(x.dtype), x)
    return x


class Counting:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, ids, **kwargs):
        self.calls += 1
        return self.model(ids, **kwargs)


SETTINGS = [dict(gen_length=12, steps=12), dict(gen_length=12, steps=6, block_length=4),
            dict(gen_length=8, steps=4, temperature=0.8, seed=3),
            dict(gen_length=8, steps=8, remasking="random", seed=1),
            dict(gen_length=8, steps=4, block_length=4, cfg_scale=1.5)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_unset_options_are_the_published_sampler_token_for_token(settings):
    model = small_model()
    prompt = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    want = published_generate(model, prompt, mask_id=MASK, **settings)
    assert torch.equal(generate(model, prompt, mask_id=MASK, **settings), want)
    # a threshold no probability reaches is the schedule again (steps a cap, the schedule's share a floor)
    if settings.get("remasking") != "random":
        assert torch.equal(generate(model, prompt, mask_id=MASK, threshold=1.0, **settings), want)


class Confident:
    """Predicts token (position + 1) with a probability set per position; records the masked positions."""

    def __init__(self, probs: list[float], vocab: int = 40):
        self.probs, self.vocab, self.masked = probs, vocab, []

    def __call__(self, x, **kwargs):
        B, L = x.shape
        logits = torch.empty(B, L, self.vocab)
        for pos in range(L):  # the other vocab - 2 tokens (not the mask) share 1 - p
            p = self.probs[pos] if pos < len(self.probs) else 0.5
            logits[:, pos] = torch.tensor((1 - p) / (p * (self.vocab - 2))).log()
            logits[:, pos, pos + 1] = 0.0
        self.masked.append((x[0] == MASK).nonzero().flatten().tolist())
        return logits


def test_threshold_keeps_every_token_at_or_above_it_and_at_least_the_surest():
    # prompt of 2; answer positions 2..7 with these probabilities of their prediction
    probs = [0.5, 0.5, 0.97, 0.2, 0.96, 0.3, 0.94, 0.4]
    model = Confident(probs)
    out = generate(model, torch.tensor([[7, 8]]), gen_length=6, steps=6, mask_id=MASK, threshold=0.95)
    assert out.tolist() == [[7, 8, 3, 4, 5, 6, 7, 8]]
    # pass 1: 2 and 4 (>= 0.95); pass 2: none left above, so the surest one (6, 0.94); then one at a time
    assert model.masked == [[2, 3, 4, 5, 6, 7], [3, 5, 6, 7], [3, 5, 7], [3, 5], [3]]
    # Fast-dLLM's factor rule: the n-th most confident needs p >= 1 - f/(n+1): 0.97, 0.96, 0.94 pass with f=0.3
    model = Confident(probs)
    generate(model, torch.tensor([[7, 8]]), gen_length=6, steps=6, mask_id=MASK, factor=0.3)
    assert model.masked[:2] == [[2, 3, 4, 5, 6, 7], [3, 5, 7]]


def test_steps_caps_the_passes_with_a_threshold():
    model = Counting(Confident([0.5] * 20))  # nothing reaches the threshold: the schedule's share each pass
    generate(model, torch.tensor([[7, 8]]), gen_length=8, steps=4, block_length=4, mask_id=MASK, threshold=0.9)
    assert model.calls == 4
    model = Counting(Confident([0.99] * 20))  # everything does: one pass per block
    generate(model, torch.tensor([[7, 8]]), gen_length=8, steps=8, block_length=4, mask_id=MASK, threshold=0.9)
    assert model.calls == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold=0.9, remasking="random"), "remasking='random' has none"),
    (dict(threshold=1.5), r"threshold=1.5 must be in \(0, 1\]"),
    (dict(threshold=0.9, factor=1.0), "set one of them"),
    (dict(factor=0.0), "factor=0.0 must be > 0"),
])
def test_fast_settings_errors(kwargs, message):
    with pytest.raises(GenerateError, match=message):
        generate(Confident([]), torch.tensor([[1]]), gen_length=4, steps=4, mask_id=MASK, **kwargs)


@pytest.mark.parametrize("mode, shift", [("prefix", False), ("dual", False), ("dual", True)])
def test_a_cache_window_right_after_filling_is_the_full_pass(mode, shift):
    """With nothing changed since the fill, the window's logits are the full pass's (RoPE positions, GQA,
    padding mask, shifted prediction): the cache's only approximation is the staleness of what it holds."""
    model = small_model(qkv_bias=True, shift_prediction=shift)
    ids = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 20, dtype=torch.bool)
    keep[1, :3] = False
    cache = KVCache(mode)
    with torch.no_grad():
        full = model(ids, attention_mask=keep)
        lo, hi = cache.reset(20)
        assert torch.allclose(model(ids, attention_mask=keep, cache=cache), full, atol=1e-5)
        lo, hi = cache.window(8, 12)
        assert (lo, hi) == ((7, 12) if mode == "dual" else (7, 20))  # from the position before the block
        window = model(ids[:, lo:hi], attention_mask=keep, cache=cache)
    assert (window[:, 1:] - full[:, lo + 1:hi]).abs().max() < 1e-4
    assert (window - model(ids[:, lo:hi])).abs().max() > 1e-2  # without the cache it sees only the window


@pytest.mark.parametrize("options", [{}, {"threshold": 0.3}, {"cache": "prefix"}, {"cache": "dual", "factor": 1.0},
                                     {"cache": "dual", "cfg_scale": 1.0, "shift": True}])
def test_a_left_padded_batch_gives_each_prompt_what_it_gets_alone(options):
    options = dict(options)
    model = small_model(seed=2, shift_prediction=options.pop("shift", False))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 7, 5)]

    def run(batch):
        ids, mask = left_pad(batch, pad_id=VOCAB - 1)
        cache = KVCache(options["cache"]) if "cache" in options else None
        kwargs = {k: v for k, v in options.items() if k != "cache"}
        out = generate(model, ids, 8, 8, MASK, block_length=4, prompt_mask=mask, cache=cache, **kwargs)
        return out[:, ids.shape[1]:].tolist()

    assert run(prompts) == [run([p])[0] for p in prompts]
    if not options:  # before: the padding attended to, the padded rows' answers differed
        ids, _ = left_pad(prompts, pad_id=VOCAB - 1)
        assert generate(model, ids, 8, 8, MASK, block_length=4)[:, ids.shape[1]:].tolist() != run(prompts)


def ranks_in_step(rank: int, port: int, out) -> None:
    """Rank 0's prompt is decided in one pass per block, rank 1's takes four: the forward all-reduces
    (as ZeRO-3 gathers parameters), so any rank that called it less often would hang the other."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    model = Confident([0.99 if rank == 0 else 0.5] * 20)

    def forward(x, **kwargs):
        dist.all_reduce(torch.ones(1))
        return model(x)

    def all_done(done: bool) -> bool:
        flag = torch.tensor([int(done)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    x = generate(forward, torch.tensor([[7, 8]]), gen_length=8, steps=8, block_length=4, mask_id=MASK,
                 threshold=0.9, all_done=all_done)
    out.put((rank, len(model.masked), x.tolist()))
    dist.destroy_process_group()


def test_two_ranks_that_need_different_numbers_of_passes_stay_in_step():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=ranks_in_step, args=(r, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = sorted(out.get(timeout=10) for _ in procs)
    # both called the model 8 times (rank 1's count); rank 0's answer is the same as alone (2 passes)
    assert [r[1] for r in results] == [8, 8]
    assert results[0][2] == results[1][2] == [[7, 8, 3, 4, 5, 6, 7, 8, 9, 10]]


class Windows(Counting):
    """Records each pass's window (start, end) and how far it extends the cache."""

    def __init__(self, model, cache):
        super().__init__(model)
        self.cache, self.passes = cache, []

    def __call__(self, ids, **kwargs):
        before = self.cache.done
        out = super().__call__(ids, **kwargs)
        self.passes.append((self.cache.start, self.cache.length, before, self.cache.done))
        return out


BLOCK_CASES = [dict(prompt=8, gen_length=12, steps=12), dict(prompt=5, gen_length=11, steps=6),
               dict(prompt=3, gen_length=9, steps=9, temperature=0.9, seed=4),
               dict(prompt=6, gen_length=10, steps=10, remasking="random", seed=2),
               dict(prompt=5, gen_length=8, steps=8, cfg_scale=1.5),
               dict(prompt=7, gen_length=12, steps=12, threshold=0.2),
               dict(prompt=4, gen_length=12, steps=12, factor=1.0), dict(prompt=1, gen_length=15, steps=5),
               dict(prompt=9, gen_length=7, steps=14, temperature=0.5, threshold=0.1, shift=True),
               dict(prompt=2, gen_length=6, steps=6, cfg_scale=1.0, remasking="random", shift=True)]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_the_block_cache_gives_the_uncached_tokens_and_computes_each_committed_block_once(case):
    """fp64: the cached sampler's tokens are the uncached one's, whatever the options; each pass computes
    only what is not cached, each committed block is cached once, and what is cached equals a fresh pass."""
    case = dict(case)
    prompt_len, shift = case.pop("prompt"), case.pop("shift", False)
    model = small_model(qkv_bias=True, shift_prediction=shift).double()
    prompt = torch.randint(1, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    plain = Counting(model)
    expected = generate_blocks(plain, prompt, mask_id=MASK, block_size=4, **case)
    cache = BlockKVCache(4)
    cached = Windows(model, cache)
    out = generate_blocks(cached, prompt, mask_id=MASK, block_size=4, cache=cache, **case)
    assert torch.equal(out, expected)
    assert cached.calls == plain.calls
    for start, end, before, after in cached.passes:
        assert start == before  # nothing cached is computed again
        assert after == max(before, (end - 1) // 4 * 4)  # the committed blocks, cached at once
    assert cache.done == (out.shape[1] - 1) // 4 * 4
    assert sum(after - before for _, _, before, after in cached.passes) == cache.done  # each block once
    fresh, rows = BlockKVCache(4), out
    if case.get("cfg_scale"):  # the unconditional rows: every committed block is the prompt then, masked
        rows = torch.cat([out, torch.where(torch.arange(out.shape[1]) < cache.done, MASK, out)])
    fresh.reset(out.shape[1])
    with torch.no_grad():
        model(rows, block_size=4, cache=fresh)
    for mine, ref in zip(cache.keys + cache.values, fresh.keys + fresh.values, strict=True):
        assert (mine - ref).abs().max() < 1e-12
    # after the first pass, a pass computes the current block and at most the one committed just before it
    assert all(start >= (end - 1) // 4 * 4 - 4 for start, end, _, _ in cached.passes[1:])


def test_the_block_cache_serves_batches_through_generate_block_rows():
    model = small_model().double()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12]]
    padded, prompt_mask = left_pad(prompts, 0)
    plain = generate_block_rows(model, padded, prompt_mask, 9, 9, MASK, 4, temperature=0.6, seed=1, threshold=0.3)
    cached = generate_block_rows(model, padded, prompt_mask, 9, 9, MASK, 4, temperature=0.6, seed=1, threshold=0.3,
                                 new_cache=lambda: make_cache("block", 4))
    assert torch.equal(plain, cached)


@pytest.mark.parametrize("name, block_size, message", [
    ("prefix", 4, "cache=prefix: this is a block diffusion model (block size 4); its cache is cache=block (exact)"),
    ("dual", 8, "cache=dual: this is a block diffusion model (block size 8)"),
    ("block", None, "cache=block is the exact cache of block diffusion models; this model attends to the whole"),
    ("lru", None, "cache='lru' is not one of none, prefix, dual, block")])
def test_a_cache_that_does_not_serve_the_model_is_refused_in_one_line(name, block_size, message):
    with pytest.raises(ValueError) as e:
        make_cache(name, block_size)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert make_cache("none", block_size) is None and make_cache(None, block_size) is None
    model = small_model()
    with pytest.raises(ValueError, match="cache=prefix does not serve this pass"):
        model(torch.ones(1, 8, dtype=torch.long), block_size=4, cache=KVCache("prefix"))
