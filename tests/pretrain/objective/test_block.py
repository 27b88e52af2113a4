"""Block diffusion's objective (pretrain/objective/block.py, noise.py): its limit cases in fp32, the
block-size schedule, the keyed draws and complementary masks."""

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import BlockConfig, BlockScheduleConfig
from pretrain.model.transformer import LLaDAModel
from pretrain.objective.block import block_size_at, block_times, inference_block_size, pass_block_size
from pretrain.objective.diffusion import Linear, forward_process, model_loss_and_stats, random_length, sample_times
from pretrain.objective.noise import complement, keyed_uniforms
from tests.pretrain.model.test_model import tiny

MASK = 96


def model_and_batch(L=32, B=3, seed=0):
    torch.manual_seed(seed)
    return LLaDAModel(tiny()).float(), torch.randint(0, MASK, (B, L))


def test_one_block_of_the_whole_sequence_is_llada():
    model, x0 = model_and_batch()
    B, L = x0.shape
    t = sample_times("iid", B, 0, B, 1e-3, torch.Generator().manual_seed(2))
    u = keyed_uniforms([11, 12, 13], L)
    plain = forward_process(x0, MASK, t, Linear(), uniforms=u)
    per_block = forward_process(x0, MASK, t[:, None], Linear(), uniforms=u)  # one block: the same masks
    assert torch.equal(plain.masked, per_block.masked)
    today = model_loss_and_stats(model, x0, plain)[0]
    forced = model_loss_and_stats(model, x0, per_block, block_size=L)[0]  # the 2L pass with one block
    torch.testing.assert_close(forced, today, rtol=0, atol=1e-6)
    default = model_loss_and_stats(model, x0, per_block, block_size=pass_block_size(L, L))[0]
    assert pass_block_size(L, L) is None and torch.equal(default, today)  # B = L takes today's path, bitwise


def test_block_one_fully_masked_is_the_autoregressive_nll():
    model, x0 = model_and_batch(L=16, B=2)
    B, L = x0.shape
    t = torch.ones(B, L, dtype=torch.float64)  # B = 1: one block per token, every one at t = 1
    noisy = forward_process(x0, MASK, t, Linear(), uniforms=keyed_uniforms([1, 2], L))
    assert noisy.masked.all()
    loss = model_loss_and_stats(model, x0, noisy, block_size=1)[0]
    model.cfg.attention_anneal_steps, model.step = 10**9, 0  # step 0 of an anneal: the causal mask
    ce = []
    for i in range(L):  # one causal forward per position: the clean tokens before i, a mask at i
        ids = torch.cat([x0[:, :i], torch.full((B, 1), MASK)], dim=1)
        ce.append(F.cross_entropy(model(ids)[:, -1].float(), x0[:, i], reduction="none"))
    reference = torch.stack(ce, dim=1).mean()  # (1/L) sum_i CE_i, averaged over the batch
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-5)


def test_per_block_times_mask_each_block_at_its_own_rate():
    L, nb = 4096, 4
    x0 = torch.zeros(1, L, dtype=torch.long)
    t = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    noisy = forward_process(x0, MASK, t, Linear(), uniforms=keyed_uniforms([5], L))
    rates = noisy.masked.view(nb, L // nb).float().mean(1)
    torch.testing.assert_close(rates, t[0].float(), rtol=0, atol=0.04)
    torch.testing.assert_close(noisy.weight.view(nb, -1)[:, 0], 1 / t[0].float())
    none = forward_process(x0, MASK, t, Linear(), uniforms=keyed_uniforms([5], L), elbo_weight=False)
    assert torch.equal(none.weight, torch.ones_like(none.weight)) and torch.equal(none.masked, noisy.masked)


def test_block_times_are_one_global_draw_sliced_by_rank():
    whole = block_times("stratified", 4, 0, 4, 3, 1e-3, torch.Generator().manual_seed(0))
    half = block_times("stratified", 4, 2, 2, 3, 1e-3, torch.Generator().manual_seed(0))
    assert whole.shape == (4, 3) and torch.equal(whole[2:], half)
    band = block_times("iid", 64, 0, 64, 2, 0.3, torch.Generator().manual_seed(0), high=0.8)
    assert band.min() >= 0.3 and band.max() <= 0.8


def schedule(unit="steps", points=((0, 1), (2, 4), (4, 16), (6, 8))):
    return BlockConfig(size=None, schedule=BlockScheduleConfig(unit, [list(p) for p in points]), noise="block",
                       weight="elbo", embedding_noise=0.0)


def test_the_block_schedule_is_a_step_function_of_the_step():
    b = schedule()
    assert [block_size_at(b, 16, s, 100, 8) for s in range(8)] == [1, 1, 4, 4, 16, 16, 8, 8]
    assert inference_block_size(b, 16, 100, 8) == 8
    frac = schedule("fraction", ((0, 2), (0.5, 16)))
    assert [block_size_at(frac, 16, s, 100, 10) for s in range(10)] == [2] * 5 + [16] * 5
    assert inference_block_size(frac, 16, 100, 10) is None  # ends at the whole sequence: a plain LLaDA model
    tokens = schedule("tokens", ((0, 2), (300, 4)))
    assert [block_size_at(tokens, 16, s, 100, 10) for s in range(5)] == [2, 2, 2, 4, 4]


def test_random_lengths_are_whole_blocks():
    x0 = torch.zeros(2, 64, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    lengths = {random_length(x0, 1.0, g, multiple=16).shape[1] for _ in range(200)}
    assert lengths == {16, 32, 48, 64}


def test_keyed_masks_do_not_depend_on_the_layout():
    from pretrain.loop import mask_uniforms

    # the loop's first global index of (micro, rank): (micro * world + rank) * micro_batch
    def first(micro, world, rank, b=2):
        return (micro * world + rank) * b

    one_rank = torch.cat([mask_uniforms(0, 7, first(micro, 1, 0), 2, 32) for micro in range(2)])  # 1 rank x 2 micro
    two_ranks = torch.cat([mask_uniforms(0, 7, first(0, 2, rank), 2, 32) for rank in range(2)])  # 2 ranks x 1
    assert torch.equal(one_rank, two_ranks)
    assert not torch.equal(one_rank[0], one_rank[1])
    assert not torch.equal(mask_uniforms(0, 8, 0, 2, 32), one_rank[:2])  # another step: other masks


@pytest.mark.parametrize("per_block", [False, True])
def test_the_complement_masks_the_rest_at_the_complementary_time(per_block):
    x0 = torch.randint(0, MASK, (2, 16))
    t = torch.tensor([[0.2, 0.7], [0.9, 0.4]], dtype=torch.float64) if per_block else torch.tensor([0.25, 0.6])
    noisy = forward_process(x0, MASK, t, Linear(), uniforms=keyed_uniforms([3, 4], 16))
    x2, both = complement(noisy, x0, MASK, Linear(), 1e-3)
    assert torch.equal(x2, torch.cat([x0, x0])) and both.masked.shape == (4, 16)
    assert torch.equal(both.masked[2:], ~noisy.masked)
    p = noisy.p_mask.expand(2, 16)
    torch.testing.assert_close(both.p_mask[2:].expand(2, 16), 1 - p)
    torch.testing.assert_close(both.weight[2:].expand(2, 16), 1 / (1 - p))  # linear: 1 / t' with t' = 1 - t


def test_a_prompt_that_ends_inside_a_block_decodes_the_rest_of_that_block_first():
    from pretrain.objective.sampler import pieces

    assert pieces(5, 11, 4) == [3, 4, 4]  # positions 5-7, 8-11, 12-15
    assert pieces(8, 8, 4) == [4, 4]
    assert pieces(6, 5, 4) == [2, 3]  # the last piece cut at P + gen_length


def test_block_sampling_never_lets_a_later_block_change_an_earlier_one():
    from pretrain.objective.sampler import generate_blocks

    model, _ = model_and_batch()
    model.eval()
    prompt = torch.randint(0, MASK, (1, 6))
    out = generate_blocks(model, prompt, 10, 10, MASK, block_size=4)
    assert out.shape == (1, 16) and torch.equal(out[:, :6], prompt) and not (out == MASK).any()
    # decoding only to the end of the second block gives the same first tokens: blocks are causal
    short = generate_blocks(model, prompt, 6, 6, MASK, block_size=4)
    assert torch.equal(short, out[:, :12])


def test_a_padded_batch_of_a_block_model_gives_what_each_prompt_gives_alone():
    from pretrain.objective.sampler import generate_block_rows, generate_blocks, left_pad

    model, _ = model_and_batch()
    model.eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]  # ends inside a block / inside another one
    padded, prompt_mask = left_pad(prompts, 0)
    out = generate_block_rows(model, padded, prompt_mask, 6, 6, MASK, 4, temperature=0.7, seed=3, threshold=0.2)
    for row, ids in zip(out, prompts, strict=True):
        alone = generate_blocks(model, torch.tensor([ids]), 6, 6, MASK, 4, temperature=0.7, seed=3, threshold=0.2)
        assert torch.equal(row[-6:], alone[0, -6:])


def causal_nll(model, x0):
    """sum_i CE at i of the model fed the clean tokens before i and a mask at i (one causal forward per i)."""
    model.cfg.attention_anneal_steps, model.step = 10**9, 0
    B, L = x0.shape
    ce = [F.cross_entropy(model(torch.cat([x0[:, :i], torch.full((B, 1), MASK)], 1))[:, -1].float(), x0[:, i],
                          reduction="none") for i in range(L)]
    model.cfg.attention_anneal_steps, model.step = 0, None
    return torch.stack(ce, 1)


def test_the_block_nelbo_of_block_one_is_the_autoregressive_nll():
    from pretrain.objective.likelihood import answer_nll, elbo_terms

    model, x0 = model_and_batch(L=12, B=2)
    model.eval()
    maskable = torch.ones_like(x0, dtype=torch.bool)
    terms = elbo_terms(model, x0, maskable, MASK, 2, torch.Generator().manual_seed(0), block_size=1)
    reference = causal_nll(model, x0).sum(1).double()  # one token per block: always masked, weight 1
    torch.testing.assert_close(terms, reference[:, None].expand(2, 2), rtol=0, atol=1e-4)
    # a prompt of 5 tokens: blocks of 1, so -log p(answer | prompt) is the answer's causal NLL
    nll, _ = answer_nll(model, x0[0, :5].tolist(), x0[0, 5:].tolist(), MASK, 1, torch.Generator().manual_seed(0),
                        block_size=1)
    assert abs(nll - reference.new_tensor(causal_nll(model, x0[:1])[0, 5:].sum().item()).item()) < 1e-4


def test_the_block_nelbo_scores_the_rest_of_a_block_the_prompt_ends_in():
    from pretrain.objective import likelihood

    model, x0 = model_and_batch(L=16, B=1)
    calls = []
    maskable = torch.arange(16)[None, :] >= 6  # the prompt ends inside block 1 (positions 4..7)
    original = likelihood.masked_cross_entropy
    likelihood.masked_cross_entropy = lambda f, ids, t, rows, docs, bs: calls.append(rows.clone()) or original(
        model, ids, t, rows, docs, bs)
    try:
        likelihood.block_elbo_terms(model, x0, maskable, MASK, 8, torch.Generator().manual_seed(0), block_size=4)
    finally:
        likelihood.masked_cross_entropy = original
    rows = calls[-1]
    assert not rows[:, :6].any()  # the prompt is never masked
    for j in (1, 2, 3):  # every block with something maskable masks 1..n_j of it in every draw
        n = rows[:, 4 * j: 4 * j + 4].sum(1)
        assert (n >= 1).all() and (n <= (2 if j == 1 else 4)).all()
