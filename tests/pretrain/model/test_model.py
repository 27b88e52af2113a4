import json
import subprocess
import sys

import pytest
import torch

from pretrain.checks import compose_config
from pretrain.config import ModelConfig
from pretrain.hf.format import model_config
from pretrain.model.attention import sdpa_attention, select_attention
from pretrain.model.transformer import (
    HF_PREFIX,
    LLaDAModel,
    RMSNorm,
    apply_rope,
    compile_blocks,
    count_params,
    rope_tables,
)
from tests.conftest import REPO, child_env


def tiny(**changes) -> ModelConfig:
    fields = dict(name="t", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_hidden_size=96, vocab_size=97,
                  max_sequence_length=128, rope_theta=500000.0, rms_norm_eps=1e-5, init_std=0.02, attention="sdpa",
                  document_mask=False, init_from=None)
    return model_config({**fields, **changes})


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


# -- speed and memory options: each leaves the numbers unchanged --------------------------------------
def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(a, b, rel: float = 1e-5) -> None:
    """Equal up to fp32 rounding: every gradient within rel x its tensor's largest entry."""
    gb = grads(b)
    for name, g in grads(a).items():
        err = (gb[name] - g).abs().max().item()
        assert err <= rel * g.abs().max().item() + 1e-9, f"{name}: max error {err:.3g}, scale {g.abs().max():.3g}"


def twin(cfg: ModelConfig) -> tuple[LLaDAModel, LLaDAModel]:
    torch.manual_seed(0)
    a = LLaDAModel(cfg)
    b = LLaDAModel(cfg)
    b.load_state_dict(a.state_dict())
    return a, b


def reference_loss(model, x0, masked, doc_start=None):
    """The formula as it was: the full logits, then cross-entropy of the masked rows in fp32."""
    logits = model(x0.masked_fill(masked, 96), doc_start=doc_start)
    return torch.nn.functional.cross_entropy(logits[masked].float(), x0[masked], reduction="sum")


def assert_masked_head_matches(a: LLaDAModel, b: LLaDAModel, x0: torch.Tensor, masked: torch.Tensor) -> None:
    """b's training path (masked-only head) against a's full logits: loss, gradients, argmax hits."""
    ref = reference_loss(a, x0, masked)
    ref.backward()
    ce, correct = b(x0.masked_fill(masked, 96), targets=x0, masked=masked)
    ce.sum().backward()
    torch.testing.assert_close(ce.sum(), ref, rtol=1e-6, atol=1e-5)
    assert_same_grads(a, b)
    with torch.no_grad():
        hits = (a(x0.masked_fill(masked, 96))[masked].argmax(-1) == x0[masked])
    assert torch.equal(correct, hits)


@pytest.mark.parametrize("chunk_rows", [None, 3])  # one chunk; several chunks (gradients summed across them)
def test_masked_only_head_gives_the_same_loss_and_gradients(chunk_rows):
    a, b = twin(tiny())
    if chunk_rows:
        b.transformer.ff_out.chunk_elements = 97 * chunk_rows
    assert_masked_head_matches(a, b, torch.randint(0, 96, (3, 24)), torch.rand(3, 24) < 0.5)


def test_compiled_loss_gives_the_same_loss_and_gradients_without_recompiling_per_batch():
    # Inductor for real (its CPU kernels, fp32): the two chunk functions compile once each, with the
    # row count symbolic, so batches with other numbers of masked rows (and a short last chunk) reuse them.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    a, b = twin(tiny())
    head = b.transformer.ff_out
    head.chunk_elements = 97 * 5  # 5 rows a chunk
    head.compile_loss()
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randint(0, 96, (3, 24), generator=g)
        masked = torch.rand(3, 24, generator=g) < (0.4 if seed else 0.6)
        assert_masked_head_matches(a, b, x0, masked)
        a.zero_grad(set_to_none=True)
        b.zero_grad(set_to_none=True)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # chunk_stats and chunk_grad


def test_ffn_padding_is_exact_and_invisible():
    cfg = tiny(mlp_hidden_size=100)  # not a multiple of 64: padded to 128 inside the forward
    model = LLaDAModel(cfg)
    assert model.transformer.blocks[0].ffn_pad == 28
    assert model.state_dict()["transformer.blocks.0.ff_proj.weight"].shape == (100, 64)
    assert model.state_dict()["transformer.blocks.0.ff_out.weight"].shape == (64, 100)
    d = 64
    assert count_params(model)["non_embedding_params"] == 2 * (3 * d * 100 + 2 * d * d + 2 * d * 32 + 2 * d) + d
    block = model.transformer.blocks[0]
    m = torch.randn(2, 5, d, requires_grad=True)
    unpadded = block.ff_out(torch.nn.functional.silu(block.ff_proj(m)) * block.up_proj(m))
    padded = block.ffn(m)
    torch.testing.assert_close(padded, unpadded, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(padded.sum(), block.ff_proj.weight)
    (g_ref,) = torch.autograd.grad(unpadded.sum(), block.ff_proj.weight)
    assert g.shape == (100, 64)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["full", "2"])
def test_activation_checkpointing_gives_the_same_gradients(spec):
    a, b = twin(tiny(n_layers=3))
    b.set_activation_checkpointing(spec)
    assert b.checkpoint_every == {"full": 1, "2": 2}[spec]
    x0 = torch.randint(0, 96, (2, 16))
    masked = torch.rand(2, 16) < 0.5
    reference_loss(a, x0, masked).backward()
    reference_loss(b, x0, masked).backward()
    assert_same_grads(a, b)


def test_regional_compile_gives_the_same_gradients_in_one_graph_with_aot_eager_backend():
    # aot_eager: dynamo's capture and AOT autograd, without inductor's C++ build (minutes on this
    # CPU); inductor's kernels run in bench/gpu.py on a GPU.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    a, b = twin(tiny(n_layers=3, mlp_hidden_size=100))
    compile_blocks(b, backend="aot_eager")
    x0 = torch.randint(0, 96, (2, 16))
    masked = torch.rand(2, 16) < 0.5
    reference_loss(a, x0, masked).backward()
    reference_loss(b, x0, masked).backward()
    assert_same_grads(a, b)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # the blocks share one graph


def test_rope_tables_are_computed_once_per_length_and_device():
    model = LLaDAModel(tiny())
    model(torch.randint(0, 97, (1, 10)))
    model(torch.randint(0, 97, (2, 10)))
    model(torch.randint(0, 97, (1, 12)))
    assert sorted(model._rope) == [(10, "cpu"), (12, "cpu")]
    cos, _ = model.rope(10, torch.device("cpu"))
    assert cos is model._rope[(10, "cpu")][0]


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_document_mask_gives_each_document_the_logits_it_has_alone(n_kv_heads):
    torch.manual_seed(0)
    model = LLaDAModel(tiny(n_kv_heads=n_kv_heads)).eval()
    lengths = [[7, 9, 4], [20]]
    x = torch.randint(0, 97, (2, 20))
    doc_start = torch.zeros(2, 20, dtype=torch.bool)
    for row, docs in enumerate(lengths):
        starts = torch.tensor([0] + list(torch.tensor(docs).cumsum(0)[:-1]))
        doc_start[row, starts] = True
    with torch.no_grad():
        packed = model(x, doc_start=doc_start)
        unmasked = model(x)
        for row, docs in enumerate(lengths):
            s = 0
            for n in docs:
                alone = model(x[row: row + 1, s: s + n])[0]
                torch.testing.assert_close(packed[row, s: s + n], alone, rtol=1e-4, atol=1e-5)
                s += n
    assert (packed[0] - unmasked[0]).abs().max() > 1e-3  # the mask did something in the packed row
    torch.testing.assert_close(packed[1], unmasked[1])  # one document: no change


def test_flash_varlen_matches_sdpa_document_mask():
    from pretrain.model.attention import flash_attention, flash_available

    if not flash_available():
        pytest.skip("flash-attn and a CUDA GPU are not present on this machine")
    torch.manual_seed(0)
    q = torch.randn(2, 32, 4, 16, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q[:, :, :2]), torch.randn_like(q[:, :, :2])
    doc_start = torch.zeros(2, 32, dtype=torch.bool, device="cuda")
    doc_start[0, [0, 5, 19]] = True
    doc_start[1, [3]] = True
    ref = sdpa_attention(q, k, v, sdpa_attention.documents(doc_start))
    out = flash_attention(q, k, v, flash_attention.documents(doc_start))
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
