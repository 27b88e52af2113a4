import json
import subprocess
import sys

import pytest
import torch

from pretrain.attention import sdpa_attention, select_attention
from pretrain.config import compose_config
from pretrain.model import HF_PREFIX, LLaDAModel, ModelConfig, RMSNorm, apply_rope, count_params, rope_tables
from tests.conftest import REPO, child_env


def tiny(**changes) -> ModelConfig:
    fields = dict(name="t", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_hidden_size=96, vocab_size=97,
                  max_sequence_length=128, rope_theta=500000.0, rms_norm_eps=1e-5, init_std=0.02, attention="sdpa",
                  init_from=None)
    return ModelConfig(**{**fields, **changes})


def test_logits_shape():
    model = LLaDAModel(tiny())
    assert model(torch.randint(0, 97, (3, 17))).shape == (3, 17, 97)


def test_attention_is_bidirectional():
    torch.manual_seed(0)
    model = LLaDAModel(tiny()).eval()
    x = torch.randint(0, 97, (1, 20))
    y = x.clone()
    y[0, 15] = (x[0, 15] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    # A later token changes an earlier position's output: no causal mask.
    assert (a[0, 2] - b[0, 2]).abs().max() > 1e-4


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = LLaDAModel(tiny(n_heads=4, n_kv_heads=2)).eval()
    mha = LLaDAModel(tiny(n_heads=4, n_kv_heads=4)).eval()
    state = gqa.state_dict()
    head_dim = 16
    for name, w in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # [kv_heads * hd, d] -> each kv head twice
            state[name] = w.view(2, head_dim, -1).repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_parameter_names_map_onto_the_published_checkpoint():
    names = {HF_PREFIX + n for n, _ in LLaDAModel(tiny(n_layers=2)).named_parameters()}
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    for i in range(2):
        expected |= {f"model.transformer.blocks.{i}.{p}.weight" for p in
                     ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")}
    assert names == expected


def test_no_biases_and_untied_head():
    model = LLaDAModel(tiny())
    assert all("bias" not in n for n, _ in model.named_parameters())
    assert model.transformer.wte.weight.data_ptr() != model.transformer.ff_out.weight.data_ptr()


@pytest.mark.parametrize("name, params, non_embedding", [("llada_1b", 1.49e9, 0.97e9), ("llada_8b", 8.02e9, 6.98e9)])
def test_paper_parameter_counts(name, params, non_embedding):
    cfg = compose_config([f"model={name}"])
    with torch.device("meta"):
        counts = count_params(LLaDAModel(cfg.model))
    assert abs(counts["params"] - params) < 0.005e9
    assert abs(counts["non_embedding_params"] - non_embedding) < 0.005e9


def test_model_cli_prints_counts_as_json():
    out = subprocess.run([sys.executable, "-m", "pretrain.model", "model=llada_8b"], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=120, check=True)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["model"] == "llada_8b"
    assert round(counts["params"] / 1e9, 2) == 8.02 and round(counts["non_embedding_params"] / 1e9, 2) == 6.98


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    cos, sin = rope_tables(64, 16, 500000.0, "cpu")
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):  # the same q at position i against the same k at position j
        qi = apply_rope(q.expand(1, 64, 1, 16).clone(), cos, sin)[0, i, 0]
        kj = apply_rope(k.expand(1, 64, 1, 16).clone(), cos, sin)[0, j, 0]
        return (qi * kj).sum()

    torch.testing.assert_close(score(10, 3), score(50, 43))
    assert not torch.allclose(score(10, 3), score(10, 4))


def test_rope_rotates_halves():
    # Position 1, head dim 4: pairs are (x0, x2) and (x1, x3), rotated by theta^0 and theta^-1/2.
    cos, sin = rope_tables(2, 4, 100.0, "cpu")
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4).expand(1, 2, 1, 4)
    out = apply_rope(x, cos, sin)[0, 1, 0]
    one = torch.tensor(1.0)
    torch.testing.assert_close(out, torch.tensor([torch.cos(one), 0.0, torch.sin(one), 0.0]))


def test_rmsnorm_computes_in_fp32():
    x = (torch.randn(4, 64) * 300).to(torch.bfloat16)
    norm = RMSNorm(64, 1e-5)
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x).float(), ref.to(torch.bfloat16).float())


def test_attention_backend_falls_back_to_sdpa_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the fallback is for CPU machines")
    assert select_attention("auto") is sdpa_attention
    with pytest.raises(RuntimeError, match="flash-attn"):
        select_attention("flash")
