"""Warm starts from autoregressive models (pretrain/hf/causal_import.py), with tiny random Llama, Qwen2 and
Qwen3 models made here by transformers: the name mapping (our logits = theirs under a causal mask),
the mask token's rows, the refusals, and a 2-rank ZeRO-3 run from each that resumes exactly and
exports, evaluates and generates."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.build import build
from data_pipeline.shards import Manifest
from data_pipeline.sources import demo_documents
from pretrain.checks import compose_config
from pretrain.config import ConfigError
from pretrain.export import export
from pretrain.hf.causal_import import CausalWeights, model_yaml, source_fields
from pretrain.hf.format import model_config, read_config
from pretrain.hf.pretrained import load_model, open_source
from pretrain.model.transformer import LLaDAModel
from tests.conftest import BIN, build_config, data_config, free_port, run_train, train_losses

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
# kind -> (transformers class names, the tokenizer's special tokens, extra embedding rows beyond the tokenizer,
#          config); the three cover: a reserved mask token with a tied head and Llama 3 RoPE scaling (llama),
#          an added mask in Qwen's padded rows with q/k/v biases (qwen2), an added mask in a grown embedding
#          and head with q/k norms and a head_dim apart from d_model / n_heads (qwen3).
SOURCES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
               "<|reserved_special_token_1|>"], 0,
              dict(rope_theta=500000.0, tie_word_embeddings=True, rope_scaling=LLAMA3_SCALING)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", ["<|endoftext|>"], 30,
              dict(rope_theta=1e6, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", ["<|endoftext|>"], 0,
              dict(rope_theta=1e6, tie_word_embeddings=False, head_dim=32)),
    # a mixture of experts: layer 0 dense (mlp_only_layers), layer 1 with 4 experts, top 2, normalised
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", ["<|endoftext|>"], 0,
                  dict(rope_theta=1e6, tie_word_embeddings=False, head_dim=32, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[0])),
}
DENSE = ["llama", "qwen2", "qwen3"]
SHAPES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, rms_norm_eps=1e-6)


def source_tokenizer(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(demo_documents(), trainer)
    return tok


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """kind -> (source folder, shard directory built with its tokenizer)."""
    root = tmp_path_factory.mktemp("causal")
    out, built = {}, {}  # built: the special tokens -> (tokenizer, shards), shared by qwen2 and qwen3
    for kind, (config_cls, model_cls, specials, pad_rows, extra) in SOURCES.items():
        folder = root / kind
        if tuple(specials) not in built:
            tok = source_tokenizer(specials)
            tok.save(str(root / f"{kind}-tokenizer.json"))
            shards = root / f"{kind}-shards"
            build(data_config(shards, tokenizer=str(root / f"{kind}-tokenizer.json")), build_config())
            built[tuple(specials)] = tok, shards
        tok, shards = built[tuple(specials)]
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(vocab_size=tok.get_vocab_size() + pad_rows, **SHAPES, **extra)
        getattr(transformers, model_cls)(config).save_pretrained(folder)
        tok.save(str(folder / "tokenizer.json"))
        out[kind] = (folder, shards)
    return out


def overrides(folder, shards) -> list[str]:
    """The model= overrides that describe `folder` (what python -m pretrain.hf.causal_import prints)."""
    def value(v):
        if isinstance(v, dict):
            return "{" + ",".join(f"{k}:{value(x)}" for k, x in v.items()) + "}"
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    fields = source_fields(read_config(folder), str(folder))
    fields["vocab_size"] = None
    return ([f"model.{k}={value(v)}" for k, v in fields.items()]
            + [f"model.init_from={folder}", f"data.dir={shards}",  # the tokenizer the shards were built with:
               f"data.tokenizer={Manifest.load(shards).build_config['tokenizer']}"])  # the source's, copied


ARGS = ["model=tiny", "trainer.seq_len=64", "trainer.micro_batch_size=4", "trainer.global_batch_size=8",
        "trainer.log_every=1", "trainer.precision=fp32", "optim.lr=3e-3", "optim.schedule.unit=steps",
        "optim.schedule.points=[[0,1.0]]", "logging.mode=disabled", "sample.at_end=false"]


def our_model(folder, mask=None, **changes) -> LLaDAModel:
    cfg = model_config({**source_fields(read_config(folder), str(folder)), "name": "t", "attention": "sdpa",
                        "mask_token": mask or {"new_rows": []}, **changes})
    model = LLaDAModel(cfg)
    weights = CausalWeights.open(folder, cfg)
    weights.check_names({n: p.shape for n, p in model.named_parameters()})
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights.get(name))
    return model.eval()


@pytest.mark.parametrize("kind", list(SOURCES))
def test_imported_logits_equal_transformers_under_a_causal_mask(sources, kind):
    folder, _ = sources[kind]
    theirs = getattr(transformers, SOURCES[kind][1]).from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # the default init is too small to tell much apart: widen every weight
        for p in theirs.parameters():
            p.normal_(0.0, 0.1)
    theirs.save_pretrained(folder / "wide")
    ours = our_model(folder / "wide", attention_anneal_steps=10)
    assert ours.cfg.tie_embeddings == (kind == "llama")
    ours.step = 0  # the annealed mask at step 0 is the causal one
    ids = torch.randint(0, theirs.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = theirs(ids).logits, ours(ids)
        ours.step = None  # bidirectional: the mapping test above is not vacuous
        assert (ours(ids) - expected).abs().max() > 1e-2
    assert (got - expected).abs().max() <= 1e-5


def test_mask_token_and_its_rows(sources):
    rows = {}
    for kind, (folder, shards) in sources.items():
        run = compose_config(ARGS + overrides(folder, shards))
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        source_rows = read_config(folder)["vocab_size"]
        mask = run.model.mask_token
        rows[kind] = (mask["origin"], mask["id"] - tok.get_vocab_size(), run.model.vocab_size - source_rows)
        with torch.no_grad():
            weights = CausalWeights.open(folder, run.model)
            grown = weights.get("transformer.wte.weight")
            source = transformers.AutoModelForCausalLM.from_pretrained(folder)
            original, original_head = source.get_input_embeddings().weight, source.get_output_embeddings().weight
        others = [i for i in range(source_rows) if i not in mask["new_rows"]]
        assert torch.equal(grown[others], original[others])  # every other row untouched
        if mask["origin"] == "added":
            assert torch.allclose(grown[mask["id"]], original[: tok.get_vocab_size()].mean(0))
            if not run.model.tie_embeddings:
                head = weights.get("transformer.ff_out.weight")
                assert head.shape[0] == run.model.vocab_size and torch.equal(head[others], original_head[others])
                assert torch.allclose(head[mask["id"]], original_head[: tok.get_vocab_size()].mean(0))
    # llama: its reserved token (no row added); qwen2: appended in Qwen's padded rows; qwen3: one row grown
    assert rows["llama"][0] == "reserved" and rows["llama"][2] == 0
    assert Tokenizer.from_file(str(sources["llama"][0] / "tokenizer.json")).token_to_id(
        "<|reserved_special_token_0|>") == compose_config(ARGS + overrides(*sources["llama"])).model.mask_token["id"]
    assert rows["qwen2"] == ("added", 0, 0)
    assert rows["qwen3"] == ("added", 0, 1)


def test_refusals_name_the_cause(sources, tmp_path):
    folder, shards = sources["qwen2"]
    args = ARGS + overrides(folder, shards)
    with pytest.raises(ConfigError, match=r"gives model.qkv_bias=True, but model.qkv_bias=False"):
        compose_config(args + ["model.qkv_bias=false"])
    without = [a for a in args if not a.startswith("data.dir=")] + ["data.tokenizer=null", f"data.dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"tokenize the data with its tokenizer, data.tokenizer="):
        compose_config(without)  # no data.tokenizer, and no tokenizer.json kept in data.dir
    with pytest.raises(ConfigError, match=r"is not .*tokenizer.json \(the data must use the source's tokens\)"):
        compose_config(args + [f"data.tokenizer={sources['llama'][0] / 'tokenizer.json'}"])
    other = tmp_path / "mistral"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"architecture MistralForCausalLM is not supported as a warm start"):
        compose_config(args + [f"model.init_from={other}"])
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"only pickle weights \(pytorch_model.bin\), which are refused"):
        compose_config(args + [f"model.init_from={pickled}"])
    assert "qkv_bias: true" in model_yaml(str(folder), "q") and "qk_norm: false" in model_yaml(str(folder), "q")


@pytest.mark.parametrize("kind", DENSE)  # a MoE source's run: test_a_qwen3_moe_source_...
def test_zero3_run_from_each_source_resumes_exactly_and_exports(sources, kind, tmp_path, capsys):
    folder, shards = sources[kind]
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                "pretrain.train"]
    args = [*overrides(folder, shards), "trainer.ckpt_every=1", "trainer.keep_last=0", "trainer.eval_every=0",
            "model.attention_anneal_steps=4", "model.shift_prediction=true"]
    straight = tmp_path / "straight"
    run_train(launcher, straight, shards, *ARGS, "trainer.max_steps=2", *args, timeout=600)
    resumed = tmp_path / "resumed"  # the same run, stopped after step 1 and continued
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000002")
    launcher[4] = str(free_port())
    proc = run_train(launcher, resumed, shards, *ARGS, "trainer.max_steps=2", *args, timeout=600)
    assert "at step 1" in proc.stdout
    expected = train_losses(straight)
    lines = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    again = [r["loss"] for r in lines if r.get("step") == 2 and "loss" in r]
    assert again[-1] == pytest.approx(expected[2], rel=1e-6, abs=1e-6)
    saved = read_config_yaml(straight)
    assert saved["model"]["mask_token"]["origin"] == ("reserved" if kind == "llama" else "added")

    out = tmp_path / "export"
    export(straight, out, dtype="fp32", code_repo=None)
    config = read_config(out)
    assert config["mask_token_id"] == saved["model"]["mask_token"]["id"] and config["shift_prediction"] is True
    assert config["mask_token_origin"] == saved["model"]["mask_token"]["origin"]
    assert config["weight_tying"] == (kind == "llama") and config["include_qkv_bias"] == (kind == "qwen2")
    assert config.get("qk_norm") == ("per_head_rms" if kind == "qwen3" else None)
    assert ("rope_scaling" in config) == (kind == "llama") and ("head_dim" in config) == (kind == "qwen3")
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_model(open_source(out))(ids)
        assert torch.equal(load_model(open_source(straight))(ids), ours)
        # the modeling code the export ships reads the warm-start keys (biases, norms, tying, scaling, shift)
        shipped = transformers.AutoModel.from_pretrained(out, trust_remote_code=True, dtype="auto").eval()
        assert (shipped(ids).logits - ours).abs().max() <= 1e-5

    from pretrain.evaluate import main as evaluate_main
    from pretrain.generate import main as generate_main

    evaluate_main([str(out), "--data", str(shards), "--max-sequences", "4", "--mc-num", "1", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nelbo"] > 0
    generate_main([str(out), "--prompt", "The", "--gen-length", "8", "--steps", "4", "--device", "cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion"] is not None


def read_config_yaml(run_dir) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))


@pytest.mark.parametrize("kind", ["qwen2"])
def test_init_from_alone_takes_the_architecture_from_the_folder(sources, kind, tmp_path):
    """As from_pretrained: no model= preset, no data.tokenizer (the shards' copy of the source's is compared
    by content); an explicit model= that disagrees stays refused, and so does a model.KEY= that does."""
    import subprocess

    folder, shards = sources[kind]
    alone = [*ARGS[1:], f"model.init_from={folder}", f"data.dir={shards}"]  # ARGS less model=tiny
    run = compose_config(alone)
    fields = source_fields(read_config(folder), str(folder))
    assert {k: getattr(run.model, k) for k in fields if k != "vocab_size"} == \
        {k: v for k, v in fields.items() if k != "vocab_size"}
    assert run.model.name == kind and run.model.qkv_bias and run.model.mask_token["origin"] == "added"
    assert run.model.vocab_size >= fields["vocab_size"]
    with pytest.raises(ConfigError, match=r"gives model.n_layers=2, but model.n_layers=4 \(model=tiny"):
        compose_config(["model=tiny", *alone])
    with pytest.raises(ConfigError, match=r"gives model.rope_theta=1000000.0, but model.rope_theta=10000.0"):
        compose_config([*alone, "model.rope_theta=10000.0"])
    other = tmp_path / "other-shards"  # shards built with another tokenizer: refused by content
    shutil.copytree(shards, other)
    shutil.copy(sources["llama"][0] / "tokenizer.json", other / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"is not .*tokenizer.json \(the data must use the source's tokens\)"):
        compose_config([*ARGS[1:], f"model.init_from={folder}", f"data.dir={other}"])
    proc = subprocess.run([sys.executable, "-m", "pretrain.hf.causal_import", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m pretrain.hf.causal_import FOLDER")


def test_a_qwen3_moe_source_gives_the_mixture_of_experts_and_trains_from_it(sources, tmp_path):
    """model.moe from the folder (softmax routing, top k, no shared expert, its dense layers), a preset that
    disagrees refused naming model.moe, and two ZeRO-3 steps on 2 ranks from its weights (the experts
    stacked from one tensor set per expert)."""
    folder, shards = sources["qwen3_moe"]
    alone = [*ARGS[1:], f"model.init_from={folder}", f"data.dir={shards}"]
    moe = compose_config(alone).model.moe
    assert (moe.num_experts, moe.top_k, moe.expert_hidden_size, moe.num_shared_experts, moe.first_dense_layers,
            moe.score_func, moe.norm_topk_prob, moe.routed_scaling_factor) == (4, 2, 32, 0, 1, "softmax", True, 1.0)
    assert "moe: {" in model_yaml(str(folder), "q")
    refused = r"gives model.moe=\{'num_experts': 4, 'top_k': 2.*but model.moe=\{'num_experts': 4, 'top_k': 1"
    with pytest.raises(ConfigError, match=refused):
        compose_config(ARGS + overrides(folder, shards) + ["model.moe.top_k=1"])
    weights = CausalWeights.open(folder, compose_config(alone).model)
    source = transformers.AutoModelForCausalLM.from_pretrained(folder)
    expert = source.model.layers[1].mlp.experts[3]
    assert torch.equal(weights.get("transformer.blocks.1.moe.experts.down_proj")[3], expert.down_proj.weight)
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                "pretrain.train"]
    proc = run_train(launcher, tmp_path / "run", shards, *ARGS, *overrides(folder, shards), "trainer.max_steps=2",
                     timeout=600)  # run_train names model=tiny: the folder's values as overrides
    params = sum(p.numel() for p in LLaDAModel(compose_config(alone).model).parameters())  # with the mask's row
    assert f"init_from: loaded {params:,} parameters from {folder}" in proc.stdout
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
