import torch

from pretrain.generate import generate, tokens_per_step

MASK = 0


def test_tokens_per_step_spreads_evenly():
    assert tokens_per_step(10, 4) == [3, 3, 2, 2]
    assert sum(tokens_per_step(33, 33)) == 33


def test_reveals_the_most_confident_positions_first():
    # A fake "model" that always predicts token (position + 1), with confidence rising with position.
    reveal_order = []

    def forward(x):
        B, L = x.shape
        logits = torch.full((B, L, 40), -10.0)
        for pos in range(L):
            logits[:, pos, pos + 1] = float(pos)  # later positions are more confident
        reveal_order.append((x[0] == MASK).nonzero().flatten().tolist())
        return logits

    prompt = torch.tensor([[7, 8]])
    out = generate(forward, prompt, gen_length=6, steps=3, mask_id=MASK)
    assert out.tolist() == [[7, 8, 3, 4, 5, 6, 7, 8]]
    # step 1 sees all 6 masked; the two most confident (last two) are revealed first
    assert reveal_order == [[2, 3, 4, 5, 6, 7], [2, 3, 4, 5], [2, 3]]


def test_temperature_samples_and_is_seeded():
    def forward(x):  # a flat distribution over tokens 1..9 everywhere
        logits = torch.full((*x.shape, 10), 0.0)
        logits[..., MASK] = -5.0
        return logits

    prompt = torch.tensor([[5]])
    greedy = generate(forward, prompt, 12, 4, MASK)
    a = generate(forward, prompt, 12, 4, MASK, temperature=1.0, seed=1)
    b = generate(forward, prompt, 12, 4, MASK, temperature=1.0, seed=1)
    assert torch.equal(a, b) and (a[0, 1:] != MASK).all()
    assert len(set(a[0, 1:].tolist())) > 2 and len(set(greedy[0, 1:].tolist())) == 1
