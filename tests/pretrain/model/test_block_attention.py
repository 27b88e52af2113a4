"""Block diffusion's attention (pretrain/model/block_attention.py): the mask's pattern, the model's
2L pass, and FlexAttention's forward against the dense path (its backward does not exist on a CPU)."""

import pytest
import torch

from pretrain.model.block_attention import FlexBlockAttention, SDPABlockAttention, may_attend
from pretrain.model.transformer import LLaDAModel
from tests.pretrain.model.test_model import tiny


def test_the_mask_is_bd3lms_pattern():
    L, B = 6, 2
    pos = torch.arange(2 * L)
    m = may_attend(pos[:, None], pos[None, :], L, B)
    for q in range(2 * L):
        for kv in range(2 * L):
            qn, kn, qb, kb = q < L, kv < L, (q % L) // B, (kv % L) // B
            want = (qn and kn and qb == kb) or (qn and not kn and kb < qb) or (not qn and not kn and kb <= qb)
            assert bool(m[q, kv]) == want, (q, kv)
    assert not m[L:, :L].any()  # no clean token sees a noisy one
    assert not m[:L, :L][torch.arange(L)[:, None] // B != torch.arange(L)[None, :] // B].any()


def test_a_noisy_block_changes_nothing_outside_it():
    torch.manual_seed(0)
    model = LLaDAModel(tiny()).eval()
    L, B = 16, 4
    x0 = torch.randint(0, 96, (2, L))
    noisy = x0.clone()
    noisy[:, ::3] = 96
    out = model.hidden(noisy, clean_ids=x0, block_size=B)
    changed = noisy.clone()
    changed[:, 8:12] = torch.randint(0, 96, (2, 4))  # a different block 2
    out2 = model.hidden(changed, clean_ids=x0, block_size=B)
    torch.testing.assert_close(out[:, :8], out2[:, :8], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 12:], out2[:, 12:], rtol=0, atol=0)
    # a clean token of a later block changes the noisy blocks after it only
    clean2 = x0.clone()
    clean2[:, 5] = (x0[:, 5] + 1) % 96
    out3 = model.hidden(noisy, clean_ids=clean2, block_size=B)
    torch.testing.assert_close(out[:, :8], out3[:, :8], rtol=0, atol=0)
    assert not torch.allclose(out[:, 8:], out3[:, 8:])


@pytest.mark.parametrize("documents", [False, True])
def test_flex_forward_equals_the_dense_mask(documents):
    # L = 24: 2L = 48 is no multiple of flex's default 128 tile (bd3lms issue 23's trap)
    torch.manual_seed(1)
    L, B, b, h, hkv, d = 24, 4, 2, 4, 2, 16
    q = torch.randn(b, 2 * L, h, d)
    k, v = torch.randn(b, 2 * L, hkv, d), torch.randn(b, 2 * L, hkv, d)
    doc_start = None
    if documents:
        doc_start = torch.zeros(b, L, dtype=torch.bool)
        doc_start[0, 10] = doc_start[1, 3] = doc_start[1, 17] = True
    dense, flex = SDPABlockAttention(), FlexBlockAttention(compiled=False)
    want = dense(q, k, v, dense.mask(L, B, q.device, doc_start))
    got = flex(q, k, v, flex.mask(L, B, q.device, doc_start))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_embedding_noise_touches_only_masked_tokens_in_training():
    torch.manual_seed(0)
    model = LLaDAModel(tiny())
    ids = torch.randint(0, 96, (2, 16))
    ids[:, 8:] = 96
    plain = model.embed(ids)
    model.embedding_noise = (0.5, 96)
    noisy = model.embed(ids)
    assert torch.equal(noisy[:, :8], plain[:, :8]) and not torch.allclose(noisy[:, 8:], plain[:, 8:])
    assert (noisy[:, 8:] - plain[:, 8:]).std().item() == pytest.approx(0.5, rel=0.1)
    model.eval()
    assert torch.equal(model.embed(ids), plain)  # evaluation and sampling see no noise
