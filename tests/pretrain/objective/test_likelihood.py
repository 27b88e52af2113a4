import math

import pytest
import torch

from pretrain.hf.format import model_config
from pretrain.model.transformer import LLaDAModel
from pretrain.objective.diffusion import Linear, diffusion_loss, forward_process
from pretrain.objective.likelihood import (
    NelboSums,
    answer_nll,
    draw_masks,
    elbo_terms,
    masked_cross_entropy,
    nelbo_of_batch,
    stratified_counts,
)

MASK = 15


def tiny(vocab=16, init_std=0.02) -> LLaDAModel:
    torch.manual_seed(0)
    return LLaDAModel(model_config(dict(name="t", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_hidden_size=128,
                                        vocab_size=vocab, max_sequence_length=64, rope_theta=10000.0,
                                        rms_norm_eps=1e-5, init_std=init_std, attention="sdpa"))).eval()


def test_stratified_counts_cover_one_to_n_evenly():
    g = torch.Generator().manual_seed(0)
    counts = stratified_counts(torch.tensor([8, 100, 1]), 8, g)
    assert sorted(counts[0].tolist()) == list(range(1, 9))  # K = n: every count once
    assert counts[1].min() >= 1 and counts[1].max() <= 100
    gaps = sorted(counts[1].tolist())
    assert all(abs((b - a) - 12.5) <= 1 for a, b in zip(gaps, gaps[1:], strict=False))
    assert counts[2].tolist() == [1] * 8


def test_masks_have_exact_counts_and_spare_the_prompt():
    g = torch.Generator().manual_seed(0)
    maskable = torch.ones(2, 10, dtype=torch.bool)
    maskable[1, :4] = False
    counts = torch.tensor([[1, 5, 10], [1, 3, 6]])
    masks = draw_masks(maskable, counts, g)
    assert masks.sum(-1).tolist() == counts.tolist()
    assert not masks[1, :, :4].any()


def test_nelbo_is_deterministic_and_within_its_standard_error_of_many_draws():
    model = tiny(vocab=64, init_std=0.3)  # a model with opinions: the terms vary from draw to draw
    x0 = torch.randint(0, 60, (6, 32), generator=torch.Generator().manual_seed(1))

    def estimate(mc_num, seed):
        return nelbo_of_batch(model, x0, 63, mc_num, torch.Generator().manual_seed(seed), batch_size=24).estimate()

    a, b = estimate(4, 0), estimate(4, 0)
    assert a == b
    many = estimate(512, 1)
    assert a.mc_se > 0 and many.mc_se < a.mc_se / 5
    assert abs(a.nelbo - many.nelbo) < 3 * a.mc_se, (a, many)
    assert a.tokens == 6 * 32 and a.sequences == 6 and math.isclose(a.perplexity_bound, math.exp(a.nelbo))
    assert a.se >= a.mc_se * 0.5  # the spread over sequences includes the Monte Carlo part


def test_a_llada_model_is_scored_through_its_masked_only_head_with_the_same_terms():
    model = tiny(vocab=64, init_std=0.3)
    x0 = torch.randint(0, 60, (4, 32), generator=torch.Generator().manual_seed(1))
    maskable = torch.ones_like(x0, dtype=torch.bool)
    head_rows = []
    model.transformer.ff_out.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[:-1].numel()))
    fast = elbo_terms(model, x0, maskable, 63, 3, torch.Generator().manual_seed(0), batch_size=6)
    masked_rows = sum(head_rows)
    head_rows.clear()
    full = elbo_terms(lambda ids: model(ids), x0, maskable, 63, 3, torch.Generator().manual_seed(0), batch_size=6)
    assert torch.allclose(fast, full, rtol=1e-5, atol=1e-6)
    assert sum(head_rows) == 4 * 3 * 32  # the full-logits path runs the head on every position ...
    assert 0 < masked_rows < 4 * 3 * 32  # ... the model's own path on the masked ones only


def test_document_masked_scores_equal_each_document_scored_alone():
    model = tiny(vocab=64, init_std=0.3)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 60, (1, 12), generator=g), torch.randint(0, 60, (1, 20), generator=g)
    ids, rows = torch.cat([a, b], 1), torch.rand(1, 32, generator=g) < 0.5
    noisy = ids.masked_fill(rows, 63)
    doc_start = torch.zeros(1, 32, dtype=torch.bool)
    doc_start[0, [0, 12]] = True
    together = masked_cross_entropy(model, noisy, ids, rows, doc_start)
    alone = torch.cat([masked_cross_entropy(model, noisy[:, :12], a, rows[:, :12]),
                       masked_cross_entropy(model, noisy[:, 12:], b, rows[:, 12:])])
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(masked_cross_entropy(model, noisy, ids, rows), alone, rtol=1e-3)  # the mask matters
    with pytest.raises(ValueError, match="LLaDAModel"):  # a plain forward cannot keep attention within documents
        masked_cross_entropy(lambda x: model(x), noisy, ids, rows, doc_start)


def test_forward_calls_do_not_depend_on_the_data():
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        return torch.zeros(*x.shape, 16)

    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 10, (3, 8))
    for prompt_len in (torch.tensor([0, 0, 0]), torch.tensor([7, 2, 8])):  # 8: nothing left to score
        calls.clear()
        terms = elbo_terms(forward, x0, torch.arange(8)[None, :] >= prompt_len[:, None], MASK, 5, g, batch_size=4)
        assert calls == [4, 4, 4, 3]
    assert terms[2].tolist() == [0.0] * 5


def test_sums_reduce_like_one_batch():
    g = torch.Generator().manual_seed(0)
    terms, tokens = torch.rand(6, 4, generator=g) * 10, torch.tensor([5, 6, 7, 5, 6, 7])
    whole, parts = NelboSums(), NelboSums()
    whole.add(terms, tokens)
    parts.add(terms[:2], tokens[:2])
    parts.add(terms[2:], tokens[2:])
    a, b = whole.estimate(), parts.estimate()
    assert (a.tokens, a.sequences) == (b.tokens, b.sequences)
    assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in [(a.nelbo, b.nelbo), (a.se, b.se), (a.mc_se, b.mc_se)])
    assert math.isclose(a.nelbo, terms.double().mean(1).sum().item() / 36, rel_tol=1e-12)


def copy_task(n, generator):
    """prompt [a, b] -> answer [a, b]: tokens 1..10, sequences of 4."""
    prompt = torch.randint(1, 11, (n, 2), generator=generator)
    return torch.cat([prompt, prompt], dim=1)


def test_conditional_likelihood_ranks_the_planted_answer_first():
    model = tiny().train()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(250):  # the paper's SFT objective (prompt never masked), with the project's own loss
        x0 = copy_task(64, g)
        noisy = forward_process(x0, MASK, torch.rand(64, generator=g) * 0.999 + 0.001, Linear(), g,
                                prompt_len=torch.full((64,), 2))
        loss = diffusion_loss(model(noisy.input_ids), x0, noisy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    right = 0
    for i, row in enumerate(copy_task(30, torch.Generator().manual_seed(99)).tolist()):
        prompt, answer = row[:2], row[2:]
        wrong = [[(answer[0] % 10) + 1, answer[1]], [answer[1], answer[0]] if answer[0] != answer[1] else [11, 12]]
        nll = [answer_nll(model, prompt, c, MASK, 4, torch.Generator().manual_seed(i), batch_size=4)[0]
               for c in [answer, *wrong]]
        right += min(range(3), key=nll.__getitem__) == 0
    assert right >= 27, f"the planted answer ranked first in {right}/30"
