"""FLOPs per token and MFU against numbers worked out by hand from the LLaDA architecture table."""

import pytest
import torch

from pretrain.checks import compose_config
from pretrain.model.flops import flops_per_token, matmul_params, mfu, peak_tflops
from pretrain.model.transformer import LLaDAModel
from pretrain.monitor.train_stats import throughput_metrics

# DESIGN.md's table: layers, d_model, heads, kv heads, FFN, vocab.
# llada_1b: head dim 2048/32 = 64, so k and v project to 4 x 64 = 256.
#   per layer: q 2048*2048 + k 2048*256 + v 2048*256 + attn_out 2048*2048 + 3 x 2048*5634
#            = 4,194,304 + 524,288 + 524,288 + 4,194,304 + 34,615,296 = 44,052,480
#   22 layers: 969,154,560 (the paper's 0.97B non-embedding, less the RMSNorm gains)
#   head: 2048 * 126464 = 258,998,272
LLADA_1B_MATMUL = 969_154_560 + 258_998_272
# llada_8b: full attention (kv heads = heads), per layer 4 x 4096^2 + 3 x 4096 x 12288
#            = 67,108,864 + 150,994,944 = 218,103,808; 32 layers: 6,979,321,856; head 4096 * 126464 = 517,996,544
# flops at seq 4096: 6 x matmul + 12 x layers x d_model x 4096 (1b: 7,368,916,992 + 2,214,592,512;
#                    8b: 44,983,910,400 + 6,442,450,944)
LLADA_8B_MATMUL = 6_979_321_856 + 517_996_544


def model_config(name: str):
    return compose_config([f"model={name}", "trainer.seq_len=4096"]).model


@pytest.mark.parametrize("name, matmul, layers, d_model", [("llada_1b", LLADA_1B_MATMUL, 22, 2048),
                                                           ("llada_8b", LLADA_8B_MATMUL, 32, 4096)])
def test_flops_per_token_of_the_paper_models(name, matmul, layers, d_model):
    m = model_config(name)
    assert matmul_params(m) == matmul
    # 6 per matmul parameter (forward 2, backward 4); attention QK^T and AV at seq 4096, not halved
    assert flops_per_token(m, 4096) == 6 * matmul + 12 * layers * d_model * 4096
    assert flops_per_token(m, 4096) == {"llada_1b": 9_583_509_504, "llada_8b": 51_426_361_344}[name]


def test_matmul_params_are_the_models_weight_matrices_less_the_embedding():
    m = compose_config(["model=tiny", "model.vocab_size=1024"]).model
    with torch.device("meta"):
        model = LLaDAModel(m)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and not n.endswith("wte.weight"))
    assert matmul_params(m) == matrices


def test_peak_table_matches_device_names():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("AMD Instinct MI300X") == 1307.0
    assert peak_tflops("cpu") is None
    assert peak_tflops("cpu", override=2.5) == 2.5  # cluster.peak_tflops
    assert peak_tflops("NVIDIA H100 80GB HBM3", override=700.0) == 700.0


def test_mfu_of_a_known_config():
    # llada_1b at seq 4096 on 8 H100 SXM at 320,000 tokens/s in all: 40,000 tokens/s per GPU.
    flops = 9_583_509_504
    expected = 40_000 * flops / 989e12  # = 0.38760...
    assert mfu(40_000, flops, 989.0) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.3876, abs=1e-4)
    out = throughput_metrics(tokens=320_000 * 10, seconds=10.0, steps=5, world=8, flops_token=flops, peak=989.0)
    assert out["tokens_per_s"] == pytest.approx(320_000)
    assert out["tokens_per_s_per_device"] == pytest.approx(40_000)
    assert out["tflops_per_device"] == pytest.approx(40_000 * flops / 1e12)  # 383.3
    assert out["mfu"] == pytest.approx(expected)
    assert out["step_time_s"] == pytest.approx(2.0)
    assert "mfu" not in throughput_metrics(1000, 1.0, 1, 1, flops, peak=None)  # no peak, no MFU


@pytest.mark.parametrize("L,B", [(16, 1), (16, 4), (24, 8), (16, 16)])
def test_block_attention_pairs_are_the_pairs_the_mask_opens(L, B):
    from pretrain.model.block_attention import may_attend
    from pretrain.model.flops import block_attention_pairs

    pos = torch.arange(2 * L)
    assert block_attention_pairs(L, B) == int(may_attend(pos[:, None], pos[None, :], L, B).sum())


def test_the_2l_pass_counts_its_executed_flops():
    m = compose_config(["model=llada_1b"]).model
    L, head = 4096, m.d_model * m.vocab_size
    assert flops_per_token(m, L, block_size=L) == flops_per_token(m, L)  # one block: LLaDA's pass
    dense = flops_per_token(m, L, block_size=32)
    assert dense == 6 * (2 * (LLADA_1B_MATMUL - head) + head) + 12 * 22 * 2048 * 4 * L  # (2L)^2 pairs / L tokens
    assert flops_per_token(m, L, block_size=32, sparse=True) < dense


def test_the_planner_plans_the_block_schedules_peak():
    from pretrain.plan import make_plan

    plain = make_plan(compose_config(["model=llada_1b", "cluster=gpu_node"], world_size=8), mfu=0.4)
    block = make_plan(compose_config(["model=llada_1b", "cluster=gpu_node", "block=llada2_wsd"], world_size=8), mfu=0.4)
    m = compose_config(["model=llada_1b"]).model
    assert block.flops_per_token == flops_per_token(m, 4096, block_size=1, sparse=True)  # the schedule's block 1
    assert block.activations_gb == pytest.approx(2 * plain.activations_gb)  # x_t with x_0: 2L tokens
