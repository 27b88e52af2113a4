"""The mixture of experts (pretrain/model/moe.py): limit cases against the dense path, the routing against a
brute-force reference, the balance mechanisms, the counts of LLaDA 2.0 mini. fp32, one process."""

import pytest
import torch
import torch.nn.functional as F

from pretrain.checks import compose_config
from pretrain.config import ConfigError
from pretrain.hf.format import model_config
from pretrain.model.flops import matmul_params
from pretrain.model.moe import MoEFeedForward, check_moe, router_loss, routers, update_expert_bias
from pretrain.model.rope import apply_rope, rope_tables
from pretrain.model.transformer import LLaDAModel, count_params
from pretrain.plan import active_params, total_params

MOE = dict(num_experts=8, top_k=2, expert_hidden_size=16, num_shared_experts=1, first_dense_layers=1,
           score_func="sigmoid", expert_bias=True, bias_update_rate=0.01, n_group=4, topk_group=2,
           routed_scaling_factor=2.5, norm_topk_prob=True, aux_loss_coef=0.0, z_loss_coef=0.0)


def moe_config(n_layers=2, **moe):
    fields = dict(name="t", n_layers=n_layers, d_model=32, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                  vocab_size=61, max_sequence_length=64, rope_theta=500000.0, rms_norm_eps=1e-5, init_std=0.02,
                  attention="sdpa", document_mask=False, init_from=None, moe={**MOE, **moe})
    return model_config(fields)


def test_llada2_mini_counts_are_the_published_ones():
    """16,255,638,528 parameters, 1,432,968,192 active (embedding and head included), from the model built on
    the meta device and from the planner's formulas alike."""
    m = compose_config(["model=llada2_mini"], world_size=1).model
    with torch.device("meta"):
        counts = count_params(LLaDAModel(m))
    assert counts["params"] == total_params(m) == 16_255_638_528
    assert counts["active_params"] == active_params(m) == 1_432_968_192
    # FLOPs count the active matmul weights: the input embedding is a lookup (and the norms no matmul).
    norms = m.n_layers * (2 * m.d_model + 2 * m.head_size) + m.d_model
    assert matmul_params(m) == counts["active_params"] - m.vocab_size * m.d_model - norms


def test_one_expert_equals_the_dense_swiglu():
    """E = k = 1, weight normalised to 1, no shared expert: the MoE is the dense SwiGLU, exactly."""
    torch.manual_seed(0)
    cfg = moe_config(num_experts=1, top_k=1, num_shared_experts=0, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                     expert_bias=False, bias_update_rate=0.0)
    moe = MoEFeedForward(cfg, 0.02, 0.02)
    x = torch.randn(2, 5, 32)
    e = moe.experts
    dense = F.linear(F.silu(F.linear(x, e.gate_proj[0])) * F.linear(x, e.up_proj[0]), e.down_proj[0])
    # top_k = 1: no normalisation (LLaDA 2.0's rule), so the weight is sigmoid(logit); softmax of one logit is 1
    cfg.moe.score_func = "softmax"
    torch.testing.assert_close(moe(x), dense, rtol=0, atol=1e-6)


def reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token, straight from the definition (LLaDA 2.0's gate)."""
    m, r, e = moe.router.cfg, moe.router, moe.experts
    out = []
    for t in x:
        scores = torch.sigmoid(r.weight @ t)
        biased = scores + r.expert_bias
        groups = biased.view(m.n_group, -1).topk(2, dim=-1).values.sum(-1)
        allowed = torch.zeros(m.n_group, dtype=torch.bool)
        allowed[groups.topk(m.topk_group).indices] = True
        biased = biased.masked_fill(~allowed.repeat_interleave(m.num_experts // m.n_group), float("-inf"))
        chosen = biased.topk(m.top_k).indices
        w = scores[chosen] / scores[chosen].sum() * m.routed_scaling_factor
        y = sum(wj * (e.down_proj[j] @ (F.silu(e.gate_proj[j] @ t) * (e.up_proj[j] @ t)))
                for j, wj in zip(chosen, w, strict=True))
        out.append(y + moe.shared(t))
    return torch.stack(out)


def test_routing_equals_the_token_by_token_reference_with_bias_and_groups():
    torch.manual_seed(1)
    moe = MoEFeedForward(moe_config(), 0.3, 0.02)
    moe.router.expert_bias.copy_(torch.randn(8) * 0.2)  # a bias that changes choices, not weights
    x = torch.randn(40, 32)
    torch.testing.assert_close(moe(x), reference(moe, x), rtol=1e-5, atol=1e-6)


def test_every_expert_gets_a_gradient_even_when_idle():
    """Dropless and ZeRO-3-safe: an expert that no token chose still has a (zero) gradient."""
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(), 0.02, 0.02)
    moe.router.expert_bias.copy_(torch.tensor([0., 0., 0., 0., 0., 0., 5., 5.]))  # experts 6, 7 take every token
    moe(torch.randn(10, 32)).sum().backward()
    g = moe.experts.gate_proj.grad
    assert g is not None and g[:6].abs().sum() == 0 and g[6:].abs().sum() > 0
    assert moe.router.load.tolist() == [0, 0, 0, 0, 0, 0, 10, 10]


def test_bias_update_moves_toward_balance():
    torch.manual_seed(0)
    model = LLaDAModel(moe_config(n_layers=3))
    rs = routers(model)
    assert len(rs) == 2  # layer 0 is dense
    update_expert_bias(rs, torch.tensor([[6., 0, 2, 2, 2, 2, 2, 0]] * 2))
    assert rs[0].expert_bias[0].item() == pytest.approx(-0.01) and rs[0].expert_bias[1].item() == pytest.approx(0.01)
    assert rs[1].expert_bias[2].item() == 0.0  # at the mean: unchanged


def test_aux_and_z_loss_reach_the_router():
    torch.manual_seed(0)
    model = LLaDAModel(moe_config(score_func="softmax", expert_bias=False, bias_update_rate=0.0,
                                  aux_loss_coef=0.01, z_loss_coef=0.001))
    model(torch.randint(0, 61, (2, 12)))
    loss = router_loss(model)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    loss.backward()
    assert model.transformer.blocks[1].moe.router.weight.grad.abs().sum() > 0
    with torch.no_grad():  # evaluation keeps no loss
        model(torch.randint(0, 61, (2, 12)))
    assert router_loss(model) == 0.0


def test_partial_rotary_turns_only_the_first_part_of_each_head():
    x = torch.randn(1, 6, 2, 16)
    cos, sin = rope_tables(6, 8, 10000.0, "cpu")
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y[..., :8], apply_rope(x[..., :8], cos, sin))


@pytest.mark.parametrize("change, key", [(dict(top_k=9), "top_k"), (dict(n_group=3), "n_group"),
                                        (dict(score_func="relu"), "score_func"),
                                        (dict(expert_bias=False), "bias_update_rate")])
def test_bad_moe_values_are_refused_in_one_line(change, key):
    with pytest.raises(ConfigError, match=f"model.moe.{key}"):
        check_moe(moe_config(**change))
