"""The model keys a warm start from an autoregressive model uses: the annealed attention mask, Dream's
shifted prediction, the tied head, q/k norms and biases (their logits against transformers are in
tests/pretrain/hf/test_causal_import.py)."""

import torch
import torch.nn.functional as F

from pretrain.hf.format import model_config
from pretrain.model.anneal import annealed_mask
from pretrain.model.transformer import LLaDAModel, count_params


def tiny(**changes) -> LLaDAModel:
    torch.manual_seed(0)
    return LLaDAModel(model_config(dict(name="t", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_hidden_size=96,
                                        vocab_size=97, max_sequence_length=128, attention="sdpa", **changes))).eval()


def test_annealed_mask_at_steps_0_half_and_n():
    L, N = 128, 10
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.equal(annealed_mask(L, 0, N), causal)
    half = annealed_mask(L, N // 2, N)
    assert torch.equal(half & causal, causal)  # the past stays visible
    future = half[~causal].float().mean().item()
    assert 0.45 < future < 0.55  # half of the future opened (8128 draws: 3 standard errors is 0.017)
    assert torch.equal(half, annealed_mask(L, N // 2, N))  # every rank and every resume draw the same
    assert not torch.equal(half, annealed_mask(L, N // 2 + 1, N))  # ... and a new draw each step
    assert annealed_mask(L, N, N) is None and annealed_mask(L, 3 * N, N) is None  # bidirectional
    assert annealed_mask(L, 0, 0) is None  # attention_anneal_steps=0: bidirectional from the start


def test_model_attends_through_the_annealed_mask():
    model = tiny(attention_anneal_steps=10)
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.step = 0
        causal = model(ids)
        changed = ids.clone()
        changed[:, 20:] = (changed[:, 20:] + 1) % 97
        assert torch.equal(model(changed)[:, :20], causal[:, :20])  # at step 0 nothing sees the future
        model.step = 5
        assert not torch.allclose(model(changed)[:, :20], model(ids)[:, :20])
        model.step = 10
        full = model(ids)
        model.step = None
        assert torch.equal(full, model(ids))


def test_shifted_prediction_reads_the_previous_position():
    plain, shifted = tiny(), tiny(shift_prediction=True)
    shifted.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw, logits = plain(ids), shifted(ids)
        assert torch.equal(logits, torch.cat([raw[:, :1], raw[:, :-1]], dim=1))
        # the training path (loss on masked positions) reads the same shifted outputs
        masked = torch.zeros_like(ids, dtype=torch.bool)
        masked[:, 3::4] = True
        ce, _ = shifted(ids, targets=ids, masked=masked)
        assert torch.allclose(ce, F.cross_entropy(logits[masked], ids[masked], reduction="none"), atol=1e-5)


def test_tied_head_is_one_parameter_and_biases_and_norms_exist():
    model = tiny(tie_embeddings=True, qkv_bias=True, qk_norm=True, head_dim=32)
    names = dict(model.named_parameters())
    assert "transformer.ff_out.weight" not in names
    assert model.transformer.ff_out.weight is names["transformer.wte.weight"]
    block = "transformer.blocks.0."
    assert names[block + "q_proj.bias"].shape == (4 * 32,) and names[block + "k_proj.bias"].shape == (2 * 32,)
    assert names[block + "q_norm.weight"].shape == (32,) and names[block + "q_proj.weight"].shape == (128, 64)
    counts = count_params(model)
    assert counts["params"] - counts["non_embedding_params"] == 97 * 64  # the tied matrix counted once
