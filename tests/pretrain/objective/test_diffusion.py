import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import MaskConfig
from pretrain.objective.diffusion import (
    SCHEDULES,
    Linear,
    NoisyBatch,
    diffusion_loss,
    diffusion_loss_and_stats,
    forward_process,
    make_schedule,
    random_length,
    sample_times,
)

MASK = 99
EPS = 1e-3


def mask_probability(u, eps):
    """The paper's formula, written out: p_mask = (1 - eps) u + eps for u ~ U(0, 1)."""
    return (1 - eps) * u + eps


def mask_cfg(schedule="linear", exponent=2.0, **kw) -> MaskConfig:
    fields = dict(schedule=schedule, eps=EPS, exponent=exponent, time_sampling="iid", normalize="tokens",
                  random_length_prob=0.01, conditional=False, prompt_len=None, band=None, complementary=False)
    return MaskConfig(**{**fields, **kw})


def llada_batch(x0, g, schedule=None):
    t = sample_times("iid", x0.shape[0], 0, x0.shape[0], EPS, g)
    return forward_process(x0, MASK, t, schedule or Linear(), g)


def test_linear_schedule_is_the_papers_p_mask_and_weight():
    u = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    t = EPS + (1 - EPS) * u  # what sample_times returns for draws u
    s = Linear()
    torch.testing.assert_close(s.mask_probability(t), mask_probability(u, EPS))
    torch.testing.assert_close(s.weight(t), 1 / mask_probability(u, EPS))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    s = make_schedule(mask_cfg(name, exponent=3.0))
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    h = 1e-6
    numeric = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)  # a numerical derivative of alpha
    torch.testing.assert_close(s.weight(t), -numeric / (1 - s.alpha(t)), rtol=1e-6, atol=0)
    assert (s.mask_probability(t) > 0).all() and (s.mask_probability(t) <= 1).all()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_gives_the_same_expected_loss_for_a_uniform_model(name):
    # A model predicting the uniform distribution over V tokens has CE = log V on every masked token;
    # the ELBO (in nats per token) is log V whatever the schedule.
    V, B, L = 50, 2048, 64
    s = make_schedule(mask_cfg(name))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (B, L))
    t = sample_times("stratified", B, 0, B, EPS, g)
    loss = diffusion_loss(torch.zeros(B, L, V), x0, forward_process(x0, MASK, t, s, g))
    assert loss.item() == pytest.approx(math.log(V), rel=0.03)


def test_masking_rate_matches_p_mask_per_sequence():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50, (64, 4096))
    noisy = llada_batch(x0, g)
    p = noisy.p_mask.squeeze(1)
    assert ((p >= EPS) & (p <= 1)).all()
    assert abs(p.mean().item() - 0.5) < 0.1  # t ~ U(0, 1)
    rate = noisy.masked.float().mean(1)
    sigma = torch.sqrt(p * (1 - p) / 4096)
    assert ((rate - p).abs() <= 5 * sigma + 1e-6).all()  # each row's rate within 5 sigma of its p_mask
    assert torch.equal(noisy.input_ids[noisy.masked], torch.full_like(x0[noisy.masked], MASK))
    assert torch.equal(noisy.input_ids[~noisy.masked], x0[~noisy.masked])


def test_loss_equals_the_formula_on_a_hand_computed_case():
    # B=2, L=2, vocab 2. Masked: (0,0) with p=0.5 and (1,1) with p=0.25; (0,1) and (1,0) unmasked.
    logits = torch.tensor([[[2.0, 0.0], [5.0, -5.0]], [[0.0, 0.0], [0.0, 1.0]]])
    x0 = torch.tensor([[1, 0], [0, 0]])
    masked = torch.tensor([[True, False], [False, True]])
    p = torch.tensor([[0.5], [0.25]])
    batch = NoisyBatch(torch.where(masked, MASK, x0), masked, p, 1 / p)
    ce_00 = math.log(1 + math.exp(2.0))  # target 1 against logits (2, 0)
    ce_11 = math.log(1 + math.exp(1.0))  # target 0 against logits (0, 1)
    expected = (ce_00 / 0.5 + ce_11 / 0.25) / (2 * 2)  # divided by all B*L tokens, not the 2 masked
    torch.testing.assert_close(diffusion_loss(logits, x0, batch), torch.tensor(expected))
    by_masked = (ce_00 / 0.5 + ce_11 / 0.25) / 2  # normalize=masked: by the 2 masked tokens
    torch.testing.assert_close(diffusion_loss(logits, x0, batch, "masked"), torch.tensor(by_masked))


def test_loss_is_unbiased_for_the_full_sequence_cross_entropy():
    # With a model that ignores its input, E[loss] over t and the masks equals the mean token CE.
    torch.manual_seed(0)
    logits = torch.randn(1, 32, 11)
    x0 = torch.randint(0, 11, (1, 32))
    g = torch.Generator().manual_seed(1)
    xs, ls = x0.expand(256, 32), logits.expand(256, 32, 11)
    draws = [diffusion_loss(ls, xs, llada_batch(xs, g)) for _ in range(40)]
    target = F.cross_entropy(logits[0], x0[0]).item()
    assert abs(torch.stack(draws).mean().item() / target - 1) < 0.1


def test_stratified_times_are_evenly_spaced_across_ranks():
    n_global, per_rank = 16, 4
    ranks = [sample_times("stratified", n_global, r * per_rank, per_rank, 0.0, torch.Generator().manual_seed(7))
             for r in range(4)]
    gaps = torch.cat(ranks).sort().values.diff()
    torch.testing.assert_close(gaps, torch.full((15,), 1 / 16))
    assert not torch.equal(ranks[0], ranks[1])


def test_antithetic_times_come_in_pairs():
    t = sample_times("antithetic", 8, 0, 8, 0.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(t[0::2] + t[1::2], torch.ones(4))


def test_times_are_the_same_slice_of_one_draw_on_every_rank():
    whole = sample_times("iid", 8, 0, 8, EPS, torch.Generator().manual_seed(5))
    part = sample_times("iid", 8, 4, 4, EPS, torch.Generator().manual_seed(5))
    torch.testing.assert_close(part, whole[4:])
    assert ((whole >= EPS) & (whole <= 1)).all()


def test_random_length_batches_appear_at_the_configured_rate():
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(2, 100, dtype=torch.long)
    lengths = [random_length(x0, 0.01, g).shape[1] for _ in range(20000)]
    cut = [n for n in lengths if n < 100]
    assert 140 <= len(cut) <= 260  # 200 expected, sigma ~14
    assert min(lengths) >= 1 and max(lengths) == 100
    assert len(set(cut)) > 50  # L' spread over 1..L, not one value


def test_random_length_never_cuts_at_prob_zero():
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(1, 10, dtype=torch.long)
    assert all(random_length(x0, 0.0, g).shape[1] == 10 for _ in range(1000))


def test_conditional_form_never_masks_the_prompt():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 50, (64, 32), generator=g)
    prompt_len = torch.randint(0, 31, (64,), generator=g)
    t = torch.ones(64)  # t = 1: every maskable token is masked
    noisy = forward_process(x0, MASK, t, Linear(), g, prompt_len)
    positions = torch.arange(32)[None, :]
    assert not noisy.masked[positions < prompt_len[:, None]].any()
    assert noisy.masked[positions >= prompt_len[:, None]].all()
    torch.testing.assert_close(noisy.response_len[:, 0], (32 - prompt_len).float())
    assert (noisy.input_ids[positions < prompt_len[:, None]] == x0[positions < prompt_len[:, None]]).all()


def test_conditional_loss_is_per_response_token_averaged_over_sequences():
    # The paper's SFT loss (Eq. 5), written out per sequence: sum over masked response tokens of
    # CE / p_mask, divided by that sequence's response length, then averaged over the batch.
    g = torch.Generator().manual_seed(4)
    B, L, V = 6, 16, 30
    x0 = torch.randint(0, V, (B, L), generator=g)
    prompt_len = torch.tensor([0, 3, 5, 8, 12, 15])
    t = torch.rand(B, generator=g) * 0.9 + 0.1
    noisy = forward_process(x0, MASK, t, Linear(), g, prompt_len)
    logits = torch.randn(B, L, V, generator=g)
    expected = 0.0
    for b in range(B):
        ce = F.cross_entropy(logits[b], x0[b], reduction="none")
        expected += (ce[noisy.masked[b]] / t[b]).sum() / (L - prompt_len[b])
    expected /= B
    torch.testing.assert_close(diffusion_loss(logits, x0, noisy, "tokens"), expected.float(), rtol=1e-5, atol=0)
    # With prompt_len 0 everywhere, the conditional loss is the unconditional one.
    plain = forward_process(x0, MASK, t, Linear(), torch.Generator().manual_seed(9))
    cond = forward_process(x0, MASK, t, Linear(), torch.Generator().manual_seed(9), torch.zeros(B, dtype=torch.long))
    torch.testing.assert_close(diffusion_loss(logits, x0, cond), diffusion_loss(logits, x0, plain))


def test_conditional_loss_is_an_unbiased_elbo_of_the_response_for_a_uniform_model():
    # Uniform model: E[loss] = log V per response token, whatever the prompt length.
    g = torch.Generator().manual_seed(5)
    B, L, V = 4096, 16, 64
    x0 = torch.randint(0, V, (B, L), generator=g)
    prompt_len = torch.randint(0, L, (B,), generator=g)
    t = sample_times("stratified", B, 0, B, EPS, g)
    noisy = forward_process(x0, MASK, t, Linear(), g, prompt_len)
    loss = diffusion_loss(torch.zeros(B, L, V), x0, noisy, "tokens")
    assert abs(loss.item() - math.log(V)) < 0.03 * math.log(V)


def test_trainer_takes_prompt_lengths_from_the_batch_or_the_config():
    from types import SimpleNamespace

    from pretrain.loop import Trainer

    trainer = Trainer.__new__(Trainer)  # prompt_len reads only run.mask
    batch = {"tokens": torch.zeros(3, 8, dtype=torch.long), "prompt_len": torch.tensor([1, 2, 3])}
    trainer.run = SimpleNamespace(mask=mask_cfg(conditional=True, prompt_len=None))
    assert trainer.prompt_len(batch).tolist() == [1, 2, 3]
    trainer.run = SimpleNamespace(mask=mask_cfg(conditional=True, prompt_len=5))
    assert trainer.prompt_len({"tokens": batch["tokens"]}).tolist() == [5, 5, 5]
    trainer.run = SimpleNamespace(mask=mask_cfg(conditional=False))
    assert trainer.prompt_len(batch) is None


def test_model_loss_and_stats_equals_the_logits_formula():
    # Training's path (head on the masked rows only) against diffusion_loss_and_stats on full logits.
    from pretrain.model.transformer import LLaDAModel
    from pretrain.objective.diffusion import model_loss_and_stats
    from tests.pretrain.model.test_model import tiny

    torch.manual_seed(0)
    model = LLaDAModel(tiny())
    x0 = torch.randint(0, 96, (4, 32))
    gen = torch.Generator().manual_seed(1)
    batch = forward_process(x0, 96, torch.tensor([0.1, 0.4, 0.7, 1.0]), make_schedule(mask_cfg("linear")), gen)
    for normalize in ("tokens", "masked"):
        ref, ref_stats = diffusion_loss_and_stats(model(batch.input_ids), x0, batch, normalize)
        loss, stats = model_loss_and_stats(model, x0, batch, normalize)
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        for field in ("t", "masked", "ce_sum", "weighted_sum", "correct"):
            torch.testing.assert_close(getattr(stats, field), getattr(ref_stats, field), rtol=1e-5, atol=1e-5)
