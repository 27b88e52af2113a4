import math

import torch
import torch.nn.functional as F

from pretrain.diffusion import NoisyBatch, diffusion_loss, forward_process, mask_probability, random_length

MASK = 99


def test_mask_probability_is_linear_with_floor_eps():
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(mask_probability(t, 1e-3), torch.tensor([1e-3, 0.5005, 1.0]))


def test_masking_rate_matches_p_mask_per_sequence():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50, (64, 4096))
    noisy = forward_process(x0, MASK, 1e-3, g)
    p = noisy.p_mask.squeeze(1)
    assert ((p >= 1e-3) & (p <= 1)).all()
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
    batch = NoisyBatch(torch.where(masked, MASK, x0), masked, torch.tensor([[0.5], [0.25]]))
    ce_00 = math.log(1 + math.exp(2.0))  # target 1 against logits (2, 0)
    ce_11 = math.log(1 + math.exp(1.0))  # target 0 against logits (0, 1)
    expected = (ce_00 / 0.5 + ce_11 / 0.25) / (2 * 2)  # divided by all B*L tokens, not the 2 masked
    torch.testing.assert_close(diffusion_loss(logits, x0, batch), torch.tensor(expected))


def test_loss_is_unbiased_for_the_full_sequence_cross_entropy():
    # With a model that ignores its input, E[loss] over t and the masks equals the mean token CE.
    torch.manual_seed(0)
    logits = torch.randn(1, 32, 11)
    x0 = torch.randint(0, 11, (1, 32))
    g = torch.Generator().manual_seed(1)
    xs, ls = x0.expand(256, 32), logits.expand(256, 32, 11)
    draws = [diffusion_loss(ls, xs, forward_process(xs, MASK, 1e-3, g)) for _ in range(40)]
    target = F.cross_entropy(logits[0], x0[0]).item()
    assert abs(torch.stack(draws).mean().item() / target - 1) < 0.1


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
