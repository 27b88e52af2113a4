"""The modeling code every export ships (pretrain/hf/modeling/): an export loads offline with AutoModel
and AutoModelForCausalLM in fresh venvs holding only torch and transformers (4.57.6 and 5.24.0, the
newest 5.x that installs here), and gives our model's logits; the keys the warm-start issue adds
(include_qkv_bias, qk_norm, weight_tying, rope_scaling, shift_prediction) against a reference
written out here."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

from pretrain.export import export
from pretrain.hf.modeling.configuration_llada import LLaDAConfig
from pretrain.hf.modeling.modeling_llada import LLaDAModelLM, inverse_frequencies
from pretrain.hf.pretrained import load_model, open_source
from pretrain.model.kv_cache import KVCache
from pretrain.objective.sampler import generate, left_pad
from tests.conftest import REPO
from tests.pretrain.hf.venvs import transformers_venv

TRANSFORMERS_VERSIONS = ("4.57.6", "5.24.0")
GENERATE = [dict(gen_length=8, steps=8, block_length=4), dict(gen_length=8, steps=8, block_length=4, cfg_scale=1.0),
            dict(gen_length=8, steps=8, block_length=4, threshold=0.1, cache="dual"),
            dict(gen_length=8, steps=4, factor=1.0, cache="prefix", temperature=0.5, seed=2)]

LOAD = """
import importlib.util, sys
import torch, transformers
from transformers import AutoModel, AutoModelForCausalLM
# only torch and transformers (and their own requirements): neither this project nor its dependencies
assert all(importlib.util.find_spec(m) is None for m in ("pretrain", "deepspeed", "data_pipeline", "omegaconf"))
ids_file, out_file, readme_file, gen_file, *folders = sys.argv[1:]
ids = torch.load(ids_file)
out = {"version": transformers.__version__}
gen = torch.load(gen_file)  # the shipped sampler: generate() on a left-padded batch, each setting
model = AutoModelForCausalLM.from_pretrained(folders[0], trust_remote_code=True, dtype="auto").eval()
for i, settings in enumerate(gen["settings"]):
    out["generate", i] = model.generate(gen["ids"], attention_mask=gen["mask"], **settings)
for folder in folders:
    for cls in (AutoModel, AutoModelForCausalLM):
        model = cls.from_pretrained(folder, trust_remote_code=True, dtype="auto").eval()  # config.json's dtype
        with torch.no_grad():
            out[folder, cls.__name__] = model(ids).logits
            out[folder, cls.__name__, "masked"] = model(ids, attention_mask=torch.ones_like(ids)).logits
        out[folder, cls.__name__, "class"] = type(model).__name__
readme = {}
exec(open(readme_file).read(), readme)  # docs/using_a_model.md's example, as written but for the folder
out["readme"] = readme["ids"], readme["logits"].detach()
torch.save(out, out_file)
"""


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-modeling")
    export(trained_run, root / "fp32", dtype="fp32")
    export(trained_run, root / "bf16", dtype="bf16")
    return root


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)  # both export dtypes come from it
@pytest.mark.parametrize("version", TRANSFORMERS_VERSIONS)
def test_an_export_loads_offline_in_a_venv_with_only_torch_and_transformers(version, exports, trained_run, tmp_path):
    python = transformers_venv(version)
    ids = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "load.py").write_text(LOAD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1")
    with torch.no_grad():
        want = {"fp32": load_model(open_source(trained_run))(ids),
                "bf16": load_model(open_source(trained_run), dtype=torch.bfloat16)(ids)}
    folders = {dtype: str(exports / dtype) for dtype in want}
    readme = re.search(r"## Loading an export with transformers\n.*?```python\n(.*?)```",
                       (REPO / "docs" / "using_a_model.md").read_text(), re.S)
    (tmp_path / "readme.py").write_text(readme.group(1).replace('"outputs/quick-hf"', repr(folders["fp32"])))
    prompts, mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12, 13]], 1)
    torch.save({"ids": prompts, "mask": mask.long(), "settings": GENERATE}, tmp_path / "gen.pt")
    proc = subprocess.run([str(python), str(tmp_path / "load.py"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"),
                           str(tmp_path / "readme.py"), str(tmp_path / "gen.pt"), *folders.values()],
                          cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["version"] == version
    for dtype, folder in folders.items():
        for cls in ("AutoModel", "AutoModelForCausalLM"):
            logits = got[folder, cls]
            assert got[folder, cls, "class"] == "LLaDAModelLM"
            assert logits.dtype == want[dtype].dtype  # torch_dtype from config.json
            assert torch.equal(logits, got[folder, cls, "masked"])  # an all-ones mask changes nothing
            if dtype == "fp32":
                assert (logits - want[dtype]).abs().max() <= 1e-5
            else:  # the same bf16 weights; bf16 roundings may differ (our FFN is padded to a multiple of 64)
                assert (logits.float() - want[dtype].float()).abs().max() <= 0.05 * want[dtype].abs().max()
    source = open_source(trained_run)
    for i, settings in enumerate(GENERATE):  # the shipped copy of the sampler gives our sampler's tokens
        cache = settings.get("cache")
        ours = generate(load_model(source), prompts, mask_id=source.mask_id, prompt_mask=mask.bool(),
                        **{**settings, "cache": cache and KVCache(cache)})
        assert torch.equal(got["generate", i], ours), settings
    readme_ids, readme_logits = got["readme"]
    assert readme_ids.tolist() == [open_source(trained_run).tokenizer().encode("The module").ids]
    with torch.no_grad():
        assert (readme_logits - load_model(open_source(trained_run))(readme_ids)).abs().max() <= 1e-5


# -- the keys of the warm-start issue, against a reference --------------------------------------------
SMALL = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=96,
             max_sequence_length=64, rope_theta=10000.0)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_logits(state: dict, cfg: dict, ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The forward written out from the published description (fp32, explicit softmax attention)."""
    p = {k.removeprefix("model.transformer."): v for k, v in state.items()}
    B, L = ids.shape
    H, Hkv, hd = cfg["n_heads"], cfg["n_kv_heads"], cfg["d_model"] // cfg["n_heads"]
    angles = torch.outer(torch.arange(L, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # [B, L, h, hd], pairs (i, i + hd/2)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    x = p["wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        b = {k.removeprefix(f"blocks.{i}."): v for k, v in p.items() if k.startswith(f"blocks.{i}.")}
        n = rms(x, b["attn_norm.weight"])
        q = F.linear(n, b["q_proj.weight"], b.get("q_proj.bias")).view(B, L, H, hd)
        k = F.linear(n, b["k_proj.weight"], b.get("k_proj.bias")).view(B, L, Hkv, hd)
        v = F.linear(n, b["v_proj.weight"], b.get("v_proj.bias")).view(B, L, Hkv, hd)
        if "q_norm.weight" in b:
            q, k = rms(q, b["q_norm.weight"]), rms(k, b["k_norm.weight"])
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        att = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd)  # no causal mask
        o = torch.einsum("bhlm,bmhd->blhd", att.softmax(-1), v).reshape(B, L, -1)
        x = x + F.linear(o, b["attn_out.weight"])
        m = rms(x, b["ff_norm.weight"])
        gate, up = F.linear(m, b["ff_proj.weight"]), F.linear(m, b["up_proj.weight"])
        x = x + F.linear(F.silu(gate) * up, b["ff_out.weight"])
    head = p["wte.weight"] if cfg.get("weight_tying") else p["ff_out.weight"]
    logits = F.linear(rms(x, p["ln_f.weight"]), head)
    if cfg.get("shift_prediction"):
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
    return logits


def random_state(cfg: dict, seed: int = 0) -> dict:
    """Every parameter the published names give such a config, random (norm weights too, so a swapped
    or missing norm shows)."""
    g = torch.Generator().manual_seed(seed)
    d, hd, V, F_ = cfg["d_model"], cfg["d_model"] // cfg["n_heads"], cfg["vocab_size"], cfg["mlp_hidden_size"]
    kv = cfg["n_kv_heads"] * hd
    shapes = {"wte.weight": (V, d), "ln_f.weight": (d,)}
    if not cfg.get("weight_tying"):
        shapes["ff_out.weight"] = (V, d)
    for i in range(cfg["n_layers"]):
        block = {"attn_norm.weight": (d,), "ff_norm.weight": (d,), "q_proj.weight": (d, d), "k_proj.weight": (kv, d),
                 "v_proj.weight": (kv, d), "attn_out.weight": (d, d), "ff_proj.weight": (F_, d),
                 "up_proj.weight": (F_, d), "ff_out.weight": (d, F_)}
        if cfg.get("include_qkv_bias"):
            block.update({"q_proj.bias": (d,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)})
        if cfg.get("qk_norm"):
            block.update({"q_norm.weight": (hd,), "k_norm.weight": (hd,)})
        shapes.update({f"blocks.{i}.{k}": s for k, s in block.items()})
    state = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        state["model.transformer." + name] = 1 + 0.2 * t if name.endswith("norm.weight") else 0.2 * t
    return state


VARIANTS = {
    "plain": {},
    "qkv_bias": {"include_qkv_bias": True},
    "qk_norm": {"qk_norm": "per_head_rms"},
    "tied": {"weight_tying": True},
    "llama3_rope": {"rope_scaling": LLAMA3},
    "shift": {"shift_prediction": True},
    "all": {"include_qkv_bias": True, "qk_norm": "per_head_rms", "weight_tying": True, "rope_scaling": LLAMA3,
            "shift_prediction": True},
}


def llama3_inverse_frequencies(cfg: dict) -> torch.Tensor:
    """transformers' own Llama 3 scaling (the reference for ours)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama = LlamaConfig(hidden_size=cfg["d_model"], num_attention_heads=cfg["n_heads"], rope_theta=cfg["rope_theta"],
                        rope_scaling=dict(cfg["rope_scaling"]), max_position_embeddings=cfg["max_sequence_length"])
    return ROPE_INIT_FUNCTIONS["llama3"](llama, "cpu")[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_architecture_key_matches_the_reference(variant):
    cfg = {**SMALL, **VARIANTS[variant]}
    state = random_state(cfg)
    model = LLaDAModelLM(LLaDAConfig(**cfg)).eval()
    model.load_state_dict(state, strict=True)  # exactly the named parameters: no more, no fewer
    hd = cfg["d_model"] // cfg["n_heads"]
    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    if "rope_scaling" in cfg:
        inv_freq = llama3_inverse_frequencies(cfg)
        assert torch.allclose(inverse_frequencies(model.config), inv_freq, rtol=1e-6, atol=0)
        assert not torch.allclose(inv_freq, 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2) / hd))  # it scales
    ids = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids).logits
    want = reference_logits(state, cfg, ids, inv_freq)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    if variant == "tied":  # no output head of its own (strict loading above): the logits are h @ wte.T
        assert model.get_output_embeddings() is None
        assert not any("ff_out" in n and "blocks" not in n for n, _ in model.named_parameters())
    elif variant != "plain":  # the key changes the logits: the same weights read as plain LLaDA differ
        plain = {k: v for k, v in state.items() if k in random_state(SMALL)}
        if cfg.get("weight_tying"):
            plain["model.transformer.ff_out.weight"] = state["model.transformer.wte.weight"]
        assert (reference_logits(plain, SMALL, ids, 1.0 / SMALL["rope_theta"] ** (torch.arange(0, hd, 2) / hd))
                - want).abs().max() > 1e-3


def test_padding_is_kept_out_of_attention():
    cfg = {**SMALL}
    model = LLaDAModelLM(LLaDAConfig(**cfg)).eval()
    model.load_state_dict(random_state(cfg), strict=True)
    ids = torch.randint(0, cfg["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)  # right padding: positions stay
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 5)], 1).long()
    with torch.no_grad():
        alone, masked, unmasked = model(ids).logits, model(padded, attention_mask=mask).logits, model(padded).logits
    assert (masked[:, :10] - alone).abs().max() < 1e-5
    assert (unmasked[:, :10] - alone).abs().max() > 1e-3  # without the mask the padding is attended to


@pytest.mark.parametrize("key, value, message", [
    ("block_type", "sequential", "block_type='sequential', this modeling code builds block_type='llama'"),
    ("include_bias", True, "include_bias=True"),
    ("qk_norm", "layer", "qk_norm='layer' is not one of"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "only rope_type 'llama3'"),
])
def test_a_config_it_cannot_build_is_refused(key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        LLaDAModelLM(LLaDAConfig(**SMALL, **{key: value}))


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)
def test_config_round_trips_the_published_keys(exports):
    config = json.loads((exports / "fp32" / "config.json").read_text())
    loaded = LLaDAConfig.from_pretrained(exports / "fp32")
    for key in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "rope_theta",
                "mask_token_id", "eos_token_id", "weight_tying"):
        assert getattr(loaded, key) == config[key], key
    assert loaded.hidden_size == config["d_model"] and not loaded.shift_prediction and loaded.qk_norm is None
