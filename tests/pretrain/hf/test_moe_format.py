"""LLaDA 2.0's mixture-of-experts Hugging Face format (pretrain/hf/moe_format.py) and its shipped modeling code:
a round trip through the Hub's per-expert tensors and dFactory's merged ones gives our logits exactly, an
export of the 2-rank ZeRO-3 run reads back equal, and loads offline in a venv with only torch and transformers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from pretrain.checks import compose_config
from pretrain.export import export
from pretrain.hf.format import FormatError
from pretrain.hf.moe_format import EXPERT_PROJ, from_llada2, to_llada2
from pretrain.hf.pretrained import check_init_from, copy_weights_into, load_model, open_source
from pretrain.model.transformer import LLaDAModel
from tests.pretrain.hf.venvs import transformers_venv
from tests.pretrain.model.test_moe import moe_config

LOAD = """
import importlib.util, sys
import torch
from transformers import AutoModelForCausalLM
assert all(importlib.util.find_spec(m) is None for m in ("pretrain", "deepspeed", "omegaconf"))
folder, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype="auto").eval()
with torch.no_grad():
    torch.save({"logits": model(torch.load(ids_file)).logits, "class": type(model).__name__}, out_file)
"""


def merged(tensors: dict, n_layers: int, first_dense: int, n_experts: int) -> dict:
    """The Hub's per-expert tensors in dFactory's merged layout (its scripts/moe_convertor.py `merge`)."""
    out = dict(tensors)
    for i in range(first_dense, n_layers):
        for p in EXPERT_PROJ:
            names = [f"model.layers.{i}.mlp.experts.{j}.{p}.weight" for j in range(n_experts)]
            out[f"model.layers.{i}.mlp.experts.{p}"] = torch.stack([out.pop(n) for n in names])
    return out


def test_round_trip_through_both_layouts_gives_equal_logits():
    torch.manual_seed(0)
    cfg = moe_config(n_layers=3)
    cfg.qk_norm, cfg.partial_rotary_factor = True, 0.5
    model = LLaDAModel(cfg).eval()
    for b in model.transformer.blocks[1:]:
        b.moe.router.expert_bias.copy_(torch.randn(8) * 0.1)  # moves choices: must travel with the weights
    hub = to_llada2(model.state_dict(), cfg)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in hub and "model.layers.0.mlp.gate_proj.weight" in hub
    assert hub["model.layers.2.attention.query_key_value.weight"].shape == ((4 + 2 * 2) * 8, 32)
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        want = model(ids)
    for tensors in (hub, merged(hub, 3, 1, 8)):
        back = LLaDAModel(cfg).eval()
        back.load_state_dict(dict(from_llada2(tensors.__getitem__, set(tensors), cfg)), strict=True)
        with torch.no_grad():
            assert torch.equal(back(ids), want)


def test_export_of_the_zero3_run_reads_back_and_loads_offline(moe_run, tmp_path):
    out = tmp_path / "hf"
    export(moe_run, out, dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llada2_moe" and config["num_experts"] == 8 and config["first_k_dense_replace"] == 1
    assert (out / "modeling_llada2_moe.py").is_file() and not (out / "modeling_llada.py").exists()
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = load_model(open_source(moe_run))
    assert ours.transformer.blocks[1].moe.router.expert_bias.abs().sum() > 0  # the trained bias, not zeros
    with torch.no_grad():
        want = ours(ids)
        assert torch.equal(load_model(open_source(out))(ids), want)
    # model.init_from (continued pretraining, fine-tuning): the folder's weights and biases into a fresh model
    run_model = compose_config(["model=tiny_moe", "model.vocab_size=1024"]).model
    check_init_from(str(out), run_model)
    fresh = LLaDAModel(run_model).eval()
    copy_weights_into(fresh, str(out))
    with torch.no_grad():
        assert torch.equal(fresh(ids), want)
    with pytest.raises(FormatError, match="model.moe.top_k=2, but model.moe.top_k=3"):
        check_init_from(str(out), compose_config(["model=tiny_moe", "model.moe.top_k=3"]).model)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "load.py").write_text(LOAD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1")
    proc = subprocess.run([str(transformers_venv("4.57.6")), str(tmp_path / "load.py"), str(out),
                           str(tmp_path / "ids.pt"), str(tmp_path / "got.pt")], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    assert got["class"] == "LLaDA2MoeModelLM"
    assert (got["logits"] - want).abs().max() <= 1e-5
