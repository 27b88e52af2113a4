"""LLaDA-MoE-7B-A1B's Hugging Face format (pretrain/hf/lladamoe_format.py), on tiny random folders written here
in the published form (config.json as the Hub's, model_type "llada" and architectures LLaDAMoEModelLM; the
published tensor names; a tokenizer with <|mask|>): our logits equal transformers' Qwen3-MoE with the same
weights under a causal mask (the same network, names included), and equal a plain reference of the published
forward (bidirectional, a shared expert, partial RoPE) without one; open_source / load_model / generate read the
folder; model.init_from alone gives the mixture of experts; what cannot be represented is refused in one line."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.build import build
from data_pipeline.sources import demo_documents
from pretrain.checks import compose_config
from pretrain.config import ConfigError
from pretrain.hf.causal_import import is_llada, source_fields
from pretrain.hf.format import FormatError
from pretrain.hf.lladamoe_format import is_lladamoe
from pretrain.hf.pretrained import copy_weights_into, load_model, open_source
from pretrain.model.transformer import LLaDAModel
from tests.conftest import build_config, data_config

PAD_ROWS = 16  # the embedding has rows beyond the tokenizer's, as the Hub's (157184 rows)


def published_config(vocab: int, **changes) -> dict:
    """A config.json as the Hub's LLaDA-MoE-7B-A1B (its keys; tiny sizes). rms_norm_eps is absent, as there
    (the class's default 1e-5), and norm_topk_prob is true: the published code never reads it (False)."""
    return {"architectures": ["LLaDAMoEModelLM"], "model_type": "llada",
            "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
                         "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM"},
            "vocab_size": vocab, "hidden_size": 64, "dense_intermediate_size": 96, "expert_intermediate_size": 32,
            "shared_expert_intermediate_size": None, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 128,
            "initializer_range": 0.02, "use_cache": False, "pad_token_id": 0, "eos_token_id": 0,
            "tie_word_embeddings": False, "rope_theta": 50000, "partial_rotary_factor": 1, "rope_scaling": None,
            "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None, "num_experts_per_tok": 2,
            "num_experts": 4, "output_router_logits": False, "router_aux_loss_coef": 0.01, "norm_topk_prob": True,
            "qk_layernorm": True, "moe_layer_freq": [0, 1, 1], "moe_router_enable_expert_bias": False,
            "moe_router_score_function": "softmax", "routed_scaling_factor": 1, "router_num_group": None,
            "router_topk_group": None, **changes}


def published_weights(c: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under the published names (modeling_lladamoe.py's modules), wide enough to matter."""
    g = torch.Generator().manual_seed(seed)
    d, hd = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd

    def w(*shape, base=0.0):
        return base + 0.1 * torch.randn(*shape, generator=g)

    def mlp(prefix, width):
        return {f"{prefix}gate_proj.weight": w(width, d), f"{prefix}up_proj.weight": w(width, d),
                f"{prefix}down_proj.weight": w(d, width)}

    sd = {"model.embed_tokens.weight": w(c["vocab_size"], d), "model.norm.weight": w(d, base=1.0),
          "lm_head.weight": w(c["vocab_size"], d)}
    for i, freq in enumerate(c["moe_layer_freq"]):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": w(d, base=1.0), p + "post_attention_layernorm.weight": w(d, base=1.0),
               p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(kv, d),
               p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, d)}
        if c["qk_layernorm"]:
            sd |= {p + "self_attn.q_norm.weight": w(hd, base=1.0), p + "self_attn.k_norm.weight": w(hd, base=1.0)}
        if freq == 0:
            sd |= mlp(p + "mlp.", c["dense_intermediate_size"])
            continue
        sd[p + "mlp.gate.weight"] = w(c["num_experts"], d)
        for j in range(c["num_experts"]):
            sd |= mlp(p + f"mlp.experts.{j}.", c["expert_intermediate_size"])
        if c["shared_expert_intermediate_size"] is not None:
            sd |= mlp(p + "shared_expert.", c["shared_expert_intermediate_size"])
    return sd


def published_forward(sd: dict, c: dict, ids: torch.Tensor) -> torch.Tensor:
    """The published forward, written plainly from modeling_lladamoe.py's semantics: no attention mask, RMSNorm
    (eps default 1e-5), per-head q/k norm before RoPE, rotate-half RoPE on the first head_dim x
    partial_rotary_factor dims, softmax routing over the experts, top k weights as they are, the shared expert
    added ungated. Every expert is computed on every token and weighted by zero where not chosen."""
    d, H, KV = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd, eps, (B, L) = d // H, c.get("rms_norm_eps", 1e-5), ids.shape
    rot = int(hd * c["partial_rotary_factor"])
    inv = 1.0 / c["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot)
    angles = torch.outer(torch.arange(L).float(), inv).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()

    def norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def mlp(x, p):
        return F.linear(F.silu(F.linear(x, sd[p + "gate_proj.weight"])) * F.linear(x, sd[p + "up_proj.weight"]),
                        sd[p + "down_proj.weight"])

    def rope(x):  # [B, heads, L, hd]
        turned, rest = x[..., :rot], x[..., rot:]
        x1, x2 = turned.chunk(2, dim=-1)
        return torch.cat([turned * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)

    h = sd["model.embed_tokens.weight"][ids]
    for i, freq in enumerate(c["moe_layer_freq"]):
        p = f"model.layers.{i}."
        x = norm(h, sd[p + "input_layernorm.weight"])
        q, k, v = (F.linear(x, sd[p + f"self_attn.{n}_proj.weight"]).view(B, L, -1, hd) for n in "qkv")
        if c["qk_layernorm"]:
            q, k = norm(q, sd[p + "self_attn.q_norm.weight"]), norm(k, sd[p + "self_attn.k_norm.weight"])
        q, k, v = rope(q.transpose(1, 2)), rope(k.transpose(1, 2)), v.transpose(1, 2)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        attention = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)  # every position sees every other
        h = h + F.linear((attention @ v).transpose(1, 2).reshape(B, L, d), sd[p + "self_attn.o_proj.weight"])
        x = norm(h, sd[p + "post_attention_layernorm.weight"])
        if freq == 0:
            y = mlp(x, p + "mlp.")
        else:
            top, chosen = F.linear(x, sd[p + "mlp.gate.weight"]).softmax(-1).topk(c["num_experts_per_tok"], dim=-1)
            y = sum((top * (chosen == j)).sum(-1, keepdim=True) * mlp(x, p + f"mlp.experts.{j}.")
                    for j in range(c["num_experts"]))
            if c["shared_expert_intermediate_size"] is not None:
                y = y + mlp(x, p + "shared_expert.")
        h = h + y
    return F.linear(norm(h, sd["model.norm.weight"]), sd["lm_head.weight"])


def write_folder(folder, tokenizer: Tokenizer, seed: int = 0, **changes) -> dict:
    folder.mkdir(parents=True)
    config = published_config(tokenizer.get_vocab_size() + PAD_ROWS, **changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.contiguous() for k, v in published_weights(config, seed).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(folder / "tokenizer.json"))
    return config


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """name -> (folder, its config.json); "shards": data built with the folders' tokenizer."""
    root = tmp_path_factory.mktemp("lladamoe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(demo_documents(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|mask|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tokenizer.json"))
    out = {"published": (root / "published", write_folder(root / "published", tok)),
           # what the published code also computes: a shared expert (two experts wide), half the head turned
           "shared": (root / "shared", write_folder(root / "shared", tok, seed=1, shared_expert_intermediate_size=64,
                                                    partial_rotary_factor=0.5, num_key_value_heads=4))}
    build(data_config(root / "shards", tokenizer=str(root / "tokenizer.json")), build_config())
    out["shards"] = root / "shards"
    return out


IDS = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))


def test_logits_equal_transformers_qwen3_moe_under_a_causal_mask(folders):
    """The same network as Qwen3-MoE (dense layer 0, top 2 of 4, not renormalised), with the same tensor names:
    transformers' model takes the folder's weights as they are (strict), and ours equals it, causally."""
    folder, c = folders["published"]
    reference = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=c["vocab_size"], hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0], rms_norm_eps=1e-5, rope_theta=50000.0,
        max_position_embeddings=128, tie_word_embeddings=False)).eval()
    reference.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    source = open_source(folder)
    source.model = dataclasses.replace(source.model, attention_anneal_steps=10, attention="sdpa")
    ours = load_model(source)
    ours.step = 0  # the annealed mask at step 0: the causal one
    with torch.no_grad():
        expected, got = reference(IDS).logits, ours(IDS)
        ours.step = None
        assert (ours(IDS) - expected).abs().max() > 1e-2  # bidirectional differs: the comparison is not vacuous
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["published", "shared"])
def test_bidirectional_logits_equal_the_published_forward(folders, name):
    folder, c = folders[name]
    ours = load_model(open_source(folder))
    assert ours.cfg.moe.num_shared_experts == (2 if name == "shared" else 0)
    assert ours.cfg.partial_rotary_factor == (0.5 if name == "shared" else 1.0)
    with torch.no_grad():
        expected, got = published_forward(load_file(str(folder / "model.safetensors")), c, IDS), ours(IDS)
        wrong = published_forward(load_file(str(folder / "model.safetensors")), {**c, "rope_theta": 10000}, IDS)
    assert (wrong - expected).abs().max() > 1e-2  # the reference tells a wrong reading apart
    assert (got - expected).abs().max() <= 1e-5


def test_open_source_reads_the_folder_and_generate_runs(folders, tmp_path, capsys):
    folder, c = folders["published"]
    assert is_lladamoe(c) and not is_llada(c)  # the Hub's model_type "llada" is not LLaDA's dense format
    source = open_source(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert (source.eos_id, source.mask_id) == (0, tok.token_to_id("<|mask|>"))  # config.json has no mask_token_id
    m = source.model
    assert (m.n_layers, m.d_model, m.mlp_hidden_size, m.qk_norm, m.rms_norm_eps, m.rope_theta, m.vocab_size) == \
        (3, 64, 96, True, 1e-5, 50000.0, c["vocab_size"])
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden_size, m.moe.first_dense_layers, m.moe.score_func,
            m.moe.norm_topk_prob, m.moe.routed_scaling_factor, m.moe.expert_bias) == \
        (4, 2, 32, 1, "softmax", False, 1.0, False)
    given = tmp_path / "given"
    shutil.copytree(folder, given)
    (given / "config.json").write_text(json.dumps({**c, "mask_token_id": 7}))
    assert open_source(given).mask_id == 7  # config.json's, when it has one

    from pretrain.generate import main as generate_main

    generate_main([str(folder), "--prompt", "The", "--gen-length", "8", "--steps", "4", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion"] is not None


def test_init_from_alone_gives_the_mixture_of_experts_and_its_weights(folders):
    """compose_config with model.init_from alone: the folder's model.moe; the mask token is the folder's own
    <|mask|> (no row added); the weights copied into the run's model give the published logits."""
    folder, c = folders["published"]
    alone = ["trainer.seq_len=64", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
             "trainer.precision=fp32", "logging.mode=disabled", "sample.at_end=false",
             f"model.init_from={folder}", f"data.dir={folders['shards']}"]
    run = compose_config(alone)
    m = run.model
    assert m.name == "published" and m.qk_norm and m.rope_theta == 50000.0 and m.rms_norm_eps == 1e-5
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden_size, m.moe.num_shared_experts,
            m.moe.first_dense_layers, m.moe.score_func, m.moe.norm_topk_prob, m.moe.aux_loss_coef) == \
        (4, 2, 32, 0, 1, "softmax", False, 0.01)
    assert m.mask_token["origin"] == "tokenizer" and m.mask_token["token"] == "<|mask|>"
    assert m.mask_token["new_rows"] == [] and m.vocab_size == c["vocab_size"]
    with pytest.raises(ConfigError, match=r"gives model.rope_theta=50000.0, but model.rope_theta=10000.0"):
        compose_config([*alone, "model.rope_theta=10000.0"])
    with pytest.raises(ConfigError, match=r"gives model.n_layers=3, but model.n_layers=4 \(model=tiny"):
        compose_config(["model=tiny", *alone])
    model = LLaDAModel(m).eval()
    copy_weights_into(model, str(folder))  # no process group: this process writes every tensor
    sd = load_file(str(folder / "model.safetensors"))
    assert m.mask_token["id"] == 1  # <|mask|>'s id in the folder's tokenizer: its trained rows, as published
    with torch.no_grad():
        got, expected = model(IDS), published_forward(sd, c, IDS)
        assert torch.equal(model.transformer.wte.weight, sd["model.embed_tokens.weight"])
        assert torch.equal(model.transformer.ff_out.weight, sd["lm_head.weight"])
    assert (got - expected).abs().max() <= 1e-5


def test_an_override_that_disagrees_is_refused_naming_the_key(folders):
    """A model.moe key on the command line is kept (not replaced by the folder's) and checked: refused, named;
    the same from a model= preset described by the printed fields; the folder's own value passes."""
    folder, c = folders["published"]
    alone = ["trainer.seq_len=64", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
             "logging.mode=disabled", "sample.at_end=false", f"data.dir={folders['shards']}",
             f"model.init_from={folder}"]
    assert compose_config([*alone, "+model.moe.top_k=2"]).model.moe.top_k == 2
    for override, key in (("+model.moe.top_k=1", "top_k"), ("+model.moe.norm_topk_prob=true", "norm_topk_prob")):
        with pytest.raises(ConfigError, match=rf"gives model.moe=.*but model.moe=.*\(model.moe.{key} differs; "):
            compose_config([*alone, override])

    def value(v):
        return "{" + ",".join(f"{k}:{value(x)}" for k, x in v.items()) + "}" if isinstance(v, dict) else \
            "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    described = [f"model.{k}={value(v)}" for k, v in {**source_fields(c, str(folder)), "vocab_size": None}.items()]
    assert compose_config(["model=tiny", *alone, *described]).model.moe.first_dense_layers == 1
    with pytest.raises(ConfigError, match=r"\(model.moe.first_dense_layers differs; model=tiny"):
        compose_config(["model=tiny", *alone, *described, "model.moe.first_dense_layers=0"])


REFUSED = [  # (key, value): each a config.json the published code computes otherwise than any model of ours
    ("attention_bias", True), ("clip_qkv", 8.0), ("hidden_act", "gelu"), ("moe_router_enable_expert_bias", True),
    ("moe_layer_freq", [1, 0, 1]), ("shared_expert_intermediate_size", 48), ("moe_router_score_function", "sigmoid"),
    ("routed_scaling_factor", 2.5), ("router_num_group", 2), ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("partial_rotary_factor", -1),
]


@pytest.mark.parametrize(("key", "value"), REFUSED, ids=[k for k, _ in REFUSED])
def test_what_cannot_be_represented_is_refused_in_one_line(folders, tmp_path, key, value):
    folder, c = folders["published"]
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "config.json").write_text(json.dumps({**c, key: value}))
    pattern = rf"config.json: {key}=.* is not supported \("
    with pytest.raises(FormatError, match=pattern) as e:
        open_source(other)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=pattern):
        compose_config(["trainer.seq_len=64", "logging.mode=disabled", f"model.init_from={other}",
                        f"data.dir={folders['shards']}"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_export_writes_the_folder_in_llada2s_format_with_equal_logits(folders, tmp_path):
    """pretrain.export of a LLaDA-MoE folder itself (its mask token is the tokenizer's <|mask|>, as the
    data's): LLaDA 2.0's MoE format, softmax routing and the shared expert kept, read back to equal logits."""
    from pretrain.export import export
    from pretrain.hf.pretrained import load_model

    folder, _ = folders["shared"]
    export(folder, tmp_path / "llada2", dtype="fp32")
    config = json.loads((tmp_path / "llada2" / "config.json").read_text())
    assert (config["model_type"], config["score_function"], config["norm_topk_prob"], config["num_shared_experts"],
            config["mask_token_id"]) == ("llada2_moe", "softmax", False, 2, 1)
    with torch.no_grad():
        ours, again = load_model(open_source(folder))(IDS), load_model(open_source(tmp_path / "llada2"))(IDS)
    assert torch.equal(ours, again)
