"""Export to LLaDA's published Hugging Face format, and import with model.init_from: real checkpoints
written by the real training entry point (DeepSpeed ZeRO-3 on the CPU), real files."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from data_pipeline.shards import Manifest
from pretrain.checkpoint.ds_names import optim_files
from pretrain.checkpoint.zero_files import load_state_dict
from pretrain.checks import compose_config
from pretrain.config import ConfigError
from pretrain.export import export, main
from pretrain.hf.format import HFWeights, installed_transformers, model_config
from pretrain.hf.modeling import MODELING_FILES
from pretrain.hf.pretrained import load_model, open_source
from pretrain.model.transformer import LLaDAModel
from tests.conftest import BIN, TRAIN_ARGS, run_precision, run_train

# The keys of GSAI-ML/LLaDA-8B-Base's config.json (../shared/DESIGN.md and the published file).
PUBLISHED_KEYS = [
    "activation_type", "alibi", "alibi_bias_max", "architectures", "attention_dropout", "attention_layer_norm",
    "attention_layer_norm_with_affine", "auto_map", "bias_for_layer_norm", "block_group_size", "block_type",
    "d_model", "embedding_dropout", "embedding_size", "eos_token_id", "flash_attention", "include_bias",
    "include_qkv_bias", "init_cutoff_factor", "init_device", "init_fn", "init_std", "input_emb_norm",
    "layer_norm_type", "layer_norm_with_affine", "mask_token_id", "max_sequence_length", "mlp_hidden_size",
    "mlp_ratio", "model_type", "multi_query_attention", "n_heads", "n_kv_heads", "n_layers", "pad_token_id",
    "precision", "residual_dropout", "rms_norm_eps", "rope", "rope_full_precision", "rope_theta", "scale_logits",
    "torch_dtype", "transformers_version", "use_cache", "vocab_size", "weight_tying",
]
# What the published loader (OLMo's config class) falls back to when a key is missing.
LOADER_DEFAULTS = {"rope_theta": 10000.0, "layer_norm_type": "default", "weight_tying": True, "include_bias": True,
                   "activation_type": "gelu", "block_type": "sequential", "rope": False, "n_kv_heads": None,
                   "mlp_hidden_size": None, "mlp_ratio": 4, "embedding_size": 50304, "max_sequence_length": 1024,
                   "rms_norm_eps": 1e-5, "alibi": False, "scale_logits": False, "input_emb_norm": False}


def build_like_the_published_loader(folder) -> LLaDAModel:
    """What AutoModel.from_pretrained(folder, trust_remote_code=True) builds, with our own code: the config
    read with the loader's defaults for absent keys, weights by their published names, cast to torch_dtype."""
    cfg = {**LOADER_DEFAULTS, **json.loads((folder / "config.json").read_text())}
    assert (cfg["block_type"], cfg["layer_norm_type"], cfg["activation_type"]) == ("llama", "rms", "silu")
    assert cfg["rope"] and not cfg["include_bias"] and not cfg["weight_tying"] and not cfg["alibi"]
    assert not cfg["scale_logits"] and not cfg["input_emb_norm"]
    d = cfg["d_model"]
    model_cfg = model_config(dict(
        name="published", n_layers=cfg["n_layers"], d_model=d, n_heads=cfg["n_heads"],
        n_kv_heads=cfg["n_kv_heads"] or cfg["n_heads"], mlp_hidden_size=cfg["mlp_hidden_size"] or cfg["mlp_ratio"] * d,
        vocab_size=cfg["embedding_size"] or cfg["vocab_size"], max_sequence_length=cfg["max_sequence_length"],
        rope_theta=cfg["rope_theta"], rms_norm_eps=cfg["rms_norm_eps"], init_std=0.02, attention="sdpa",
        document_mask=False, init_from=None))
    index = folder / "model.safetensors.index.json"
    files = ({folder / f for f in json.loads(index.read_text())["weight_map"].values()} if index.exists()
             else {folder / "model.safetensors"})
    state = {}
    for f in files:
        state.update(load_file(f))
    assert all(k.startswith("model.transformer.") for k in state)
    model = LLaDAModel(model_cfg)
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()}, strict=True)
    return model.to(getattr(torch, cfg["torch_dtype"])).eval()


def tokens(n=3, length=48, vocab=1024, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_consolidation_equals_deepspeeds_own(trained_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    theirs = get_fp32_state_dict_from_zero_checkpoint(str(trained_run / "checkpoints"), tag="step00000030")
    ours = load_state_dict(trained_run / "checkpoints" / "step00000030")
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    export(trained_run, root / "fp32", dtype="fp32")
    export(trained_run, root / "bf16", dtype="bf16", max_shard_size="700KB")
    return root


def test_config_has_every_published_key_and_the_runs_ids(exported, trained_run, demo_shards):
    config = json.loads((exported / "fp32" / "config.json").read_text())
    installed = installed_transformers()  # written only when it is true: the version installed here
    assert sorted(config) == [k for k in PUBLISHED_KEYS if installed or k != "transformers_version"]
    assert config.get("transformers_version") == installed
    assert config["precision"] == "fp32"  # the weights' dtype, not the published "amp_bf16"
    assert json.loads((exported / "bf16" / "config.json").read_text())["precision"] == "bf16"
    manifest = Manifest.load(demo_shards)
    assert config["mask_token_id"] == manifest.mask_id and config["eos_token_id"] == manifest.eos_id
    assert config["architectures"] == ["LLaDAModelLM"] and config["model_type"] == "llada"
    # auto_map names the modeling code every export carries (so it loads offline): pretrain/hf/modeling/
    assert config["auto_map"] == {"AutoConfig": "configuration_llada.LLaDAConfig",
                                  "AutoModel": "modeling_llada.LLaDAModelLM",
                                  "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
    for name, path in MODELING_FILES.items():
        assert (exported / "fp32" / name).read_bytes() == path.read_bytes()
    assert (config["rope_theta"], config["n_layers"], config["vocab_size"]) == (500000.0, 4, 1024)
    assert config["torch_dtype"] == "float32"
    assert json.loads((exported / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    special = json.loads((exported / "fp32" / "special_tokens_map.json").read_text())
    tok_config = json.loads((exported / "fp32" / "tokenizer_config.json").read_text())
    for names in (special, tok_config):
        assert names["eos_token"] == "<|endoftext|>" and names["mask_token"] == "<|mdm_mask|>"
    tok = Tokenizer.from_file(str(exported / "fp32" / "tokenizer.json"))
    assert tok.token_to_id("<|mdm_mask|>") == manifest.mask_id and tok.token_to_id("<|endoftext|>") == manifest.eos_id


def test_weights_shard_above_the_size_limit(exported):
    folder = exported / "bf16"
    assert not (exported / "fp32" / "model.safetensors.index.json").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    sizes = {f: sum(t.numel() * 2 for t in load_file(folder / f).values()) for f in files}
    assert sum(sizes.values()) == index["metadata"]["total_size"]
    multi = [f for f in files if len(load_file(folder / f)) > 1]
    assert all(sizes[f] <= 700_000 for f in multi)
    assert all(t.dtype == torch.bfloat16 for f in files for t in load_file(folder / f).values())


def test_published_loader_way_gives_our_logits(exported, trained_run):
    ids = tokens()
    ours = load_model(open_source(trained_run))
    with torch.no_grad():
        want = ours(ids)
        assert torch.equal(build_like_the_published_loader(exported / "fp32")(ids), want)
        theirs_bf16 = build_like_the_published_loader(exported / "bf16")(ids)
        ours_bf16 = load_model(open_source(trained_run), dtype=torch.bfloat16)(ids)
    assert torch.equal(theirs_bf16, ours_bf16)
    assert (theirs_bf16.float() - want).abs().max() < 0.1 * want.abs().max()


def test_a_missing_key_is_not_silently_defaulted(exported, tmp_path):
    folder = tmp_path / "no-rope-theta"
    shutil.copytree(exported / "fp32", folder)
    config = json.loads((folder / "config.json").read_text())
    del config["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="has no 'rope_theta'"):
        compose_config(TRAIN_ARGS + [f"model.init_from={folder}"])


def test_import_names_the_first_difference_from_model(exported):
    with pytest.raises(ConfigError, match=r"n_layers=4, but model.n_layers=2 \(model=tiny\)"):
        compose_config(TRAIN_ARGS + [f"model.init_from={exported / 'fp32'}", "model.n_layers=2"])
    compose_config(TRAIN_ARGS + [f"model.init_from={exported / 'fp32'}"])  # the matching one passes
    # model.vocab_size=null is resolved from the data later, and then checked against the folder's
    run = compose_config(["model=tiny", "model.vocab_size=null", f"model.init_from={exported / 'fp32'}"])
    assert run.model.vocab_size is None


def test_export_import_export_on_two_ranks_gives_the_same_tensors(exported, trained_run, demo_shards, tmp_path):
    # Two ZeRO-3 ranks start from the export; lr 1e-30 (optim.lr must be > 0) leaves the weights as loaded,
    # its updates below fp32 resolution; and the next export
    # must give back the very tensors (loaded by rank 0, re-partitioned, consolidated from both shards).
    # A bf16 run holds its weights in bf16 and its fp32 master copy is made from them: what comes back
    # is the import rounded to bf16, i.e. the bf16 export.
    precision = run_precision(trained_run)
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29651", "-m", "pretrain.train"]
    proc = run_train(launcher, tmp_path / "cont", demo_shards, "trainer.max_steps=1", "optim.lr=1e-30",
                     "logging.mode=disabled", f"trainer.precision={precision}",
                     f"model.init_from={exported / 'fp32'}",
                     "deepspeed.zero_optimization.stage3_param_persistence_threshold=0", timeout=600)
    assert len(optim_files(tmp_path / "cont" / "checkpoints" / "step00000001")) == 2
    params = sum(t.numel() for _, t in HFWeights.open(exported / "fp32").tensors())
    origin = json.loads((exported / "fp32" / "export.json").read_text())
    assert origin["step"] == 30 and proc.stdout.count("init_from:") == 1  # rank 0 only
    assert (f"init_from: loaded {params:,} parameters from {exported / 'fp32'} (step {origin['step']} of "
            f"{origin['source']})") in proc.stdout
    export(tmp_path / "cont", tmp_path / "again", dtype="fp32")
    expected = exported / ("fp32" if precision == "fp32" else "bf16")
    first = {k: v.float() for k, v in HFWeights.open(expected).tensors()}
    again = dict(HFWeights.open(tmp_path / "again").tensors())
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)
    ids = tokens(seed=1)
    with torch.no_grad():
        imported = load_model(open_source(tmp_path / "cont"))(ids)
        assert torch.equal(imported, load_model(open_source(expected))(ids))


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)  # precision plays no part here
def test_cli_errors(trained_run, exported, tmp_path, capsys):
    def fails(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "already exists and is not empty" in fails(trained_run, exported / "fp32")
    assert "no checkpoint at --step 7 (checkpoints at steps: [15, 30])" in fails(trained_run, tmp_path / "o",
                                                                                 "--step", 7)
    assert "neither a run directory" in fails(tmp_path, tmp_path / "o")
    assert "invalid choice: 'fp16'" in fails(trained_run, tmp_path / "o", "--dtype", "fp16")
    assert "is not a size" in fails(trained_run, tmp_path / "o", "--max-shard-size", "lots")
    assert not (tmp_path / "o").exists()
    main([str(trained_run), str(tmp_path / "o15"), "--step", "15", "--local-code"])  # the default, kept
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 15 and summary["source"].endswith("step00000015")
    config = json.loads((tmp_path / "o15" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"
    main([str(trained_run), str(tmp_path / "hub"), "--code-repo", "GSAI-ML/LLaDA-8B-Base"])
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "GSAI-ML/LLaDA-8B-Base--modeling_llada.LLaDAModelLM"
    assert (tmp_path / "hub" / "modeling_llada.py").is_file()  # copied all the same


def test_import_refuses_shards_of_another_tokenizer(exported, demo_shards):
    import dataclasses

    from pretrain.checks import validate_data

    args = TRAIN_ARGS + [f"model.init_from={exported / 'fp32'}", f"data.dir={demo_shards}", "trainer.max_steps=1"]
    manifest = Manifest.load(demo_shards)
    validate_data(compose_config(args), manifest)
    with pytest.raises(ConfigError, match=f"mask_token_id={manifest.mask_id}, but .* has mask_id=7"):
        validate_data(compose_config(args), dataclasses.replace(manifest, mask_id=7))


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)  # precision plays no part here
def test_checkpoint_folders_that_lie_are_skipped_by_every_tool_which_changes_nothing(trained_run, tmp_path, capsys):
    # Issue 26: a future-numbered folder with a random manifest failed export and evaluate; a planted
    # pickle (manifest updated to match) was 28 lines advising weights_only=False.
    import os

    from pretrain.checkpoints import main as list_checkpoints
    from pretrain.generate import main as generate
    from tests.pretrain.checkpoint.test_checkpoint import file_hashes, plant_pickle

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "pwned"
    plant_pickle(run / "checkpoints" / "step00000030" / "zero_pp_rank_0_mp_rank_00_model_states.pt", marker)
    (run / "checkpoints" / "step99999999").mkdir()
    (run / "checkpoints" / "step99999999" / "manifest.json").write_bytes(os.urandom(200))
    before = file_hashes(run)
    main([str(run), str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert json.loads(out)["step"] == 15
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and warnings[0].startswith("warning: skipping checkpoint step99999999: ")
    assert warnings[1].startswith("warning: skipping checkpoint step00000030: ") and "would unpickle" in warnings[1]
    for tool, args in ((main, [str(tmp_path / "o30"), "--step", "30"]), (generate, ["--prompt", "a", "--step", "30"])):
        with pytest.raises(SystemExit) as e:
            tool([str(run), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("error: checkpoint step00000030 is not usable: ") and "would unpickle" in err
    list_checkpoints([str(run), "--verify", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["state"] == "complete" for r in rows] == [False, False, True]  # 99999999, 30 (pickle), 15
    assert file_hashes(run) == before and not marker.exists()  # the tools moved nothing aside, ran nothing
