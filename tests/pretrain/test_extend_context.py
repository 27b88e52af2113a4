"""The context-extension stage (docs/long_context.md, conf/experiment/extend_context.yaml): a trained run is
exported and a new run starts from the export at a longer trainer.seq_len with a new RoPE. Real runs: the
tiny model trained at 64 tokens (tests/conftest.py's trained_run), continued at 128 with another rope_theta."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from data_pipeline.build import build
from pretrain.checkpoint.resume_check import refusal, refuse_before_data
from pretrain.checks import compose_config
from pretrain.config import ConfigError
from pretrain.export import export
from pretrain.hf.format import HFWeights
from pretrain.hf.pretrained import load_model, open_source
from pretrain.model.transformer import LLaDAModel
from tests.conftest import REPO, build_config, child_env, demo_data_config

LONG = 128
THETA = 2.0e6  # the source trained with tiny's 500000
# The stage as a user runs it, shrunk: init_from alone (the architecture from the export), the preset, and
# the new length and RoPE; lr 1e-30 (it must be > 0) leaves the weights as loaded, below fp32 resolution.
STAGE = ["experiment=extend_context", f"trainer.seq_len={LONG}", f"model.max_sequence_length={LONG}",
         "model.rope_scaling=null", f"model.rope_theta={THETA}", "trainer.micro_batch_size=4",
         "trainer.global_batch_size=4", "trainer.max_steps=1", "optim.lr=1e-30", "trainer.precision=fp32",
         "trainer.activation_checkpointing=none", "logging.mode=disabled"]


@pytest.fixture(scope="module")
def stage(trained_run, tmp_path_factory):
    """(the source's export, the extended run, its stdout): the fp32 trained_run exported, then one step at 128."""
    root = tmp_path_factory.mktemp("extend")
    source = root / "source"
    export(trained_run, source, dtype="fp32")
    shards = root / f"demo-{LONG}"
    build(demo_data_config(shards, seq_len=LONG), build_config())  # the same corpus and BPE, longer windows
    run_dir = root / "long"
    cmd = [sys.executable, "-m", "pretrain.train", *STAGE, f"model.init_from={source}", "data.vocab_size=1024",
           f"data.dir={shards}", f"run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return source, run_dir, proc.stdout


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)
def test_the_stage_starts_from_the_exported_weights_with_the_new_rope(stage, tmp_path):
    source, run_dir, stdout = stage
    lines = [line for line in stdout.splitlines() if "context extension" in line]
    assert lines == [f"init_from: context extension: model.max_sequence_length: 1024 -> {LONG}; "
                     f"model.rope_theta: 500000.0 -> {THETA}"]
    export(run_dir, tmp_path / "long", dtype="fp32")
    hf = json.loads((tmp_path / "long" / "config.json").read_text())
    assert (hf["rope_theta"], hf["max_sequence_length"], hf.get("rope_scaling")) == (THETA, LONG, None)
    before, after = dict(HFWeights.open(source).tensors()), dict(HFWeights.open(tmp_path / "long").tensors())
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)

    # The extended model is the source's weights under the new RoPE: its logits on 128 tokens are those of
    # the source model rebuilt with rope_theta changed, and not those of the source as it was.
    ids = torch.randint(0, 1024, (2, LONG), generator=torch.Generator().manual_seed(0))
    src = load_model(open_source(source))
    rebuilt = LLaDAModel(dataclasses.replace(src.cfg, rope_theta=THETA, max_sequence_length=LONG)).eval()
    rebuilt.load_state_dict(src.state_dict())
    with torch.no_grad():
        extended = load_model(open_source(tmp_path / "long"))(ids)
        assert torch.equal(extended, rebuilt(ids))
        assert (extended - src(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)
def test_a_resume_at_another_context_names_the_stage_and_other_changes_still_refuse(stage):
    source, run_dir, _ = stage
    same = [*STAGE, f"model.init_from={source}", f"run_dir={run_dir}"]
    refuse_before_data(compose_config(same))  # the run's own settings resume
    with pytest.raises(ConfigError) as e:
        refuse_before_data(compose_config([*same, "model.rope_theta=4e6"]))
    assert "\n" not in str(e.value) and str(e.value).endswith(
        "(model.rope_theta: 2000000.0 -> 4000000.0): to train at a longer context, export this run (python -m "
        "pretrain.export) and start a new run_dir with model.init_from (docs/long_context.md)")
    with pytest.raises(ConfigError, match=r"\(model.n_layers: 4 -> 2\): use another run_dir"):
        refuse_before_data(compose_config([*STAGE, f"run_dir={run_dir}", "model=tiny", "model.n_layers=2"]))
    # init_from lets the length and the RoPE differ from the export, nothing else: one line naming the key
    with pytest.raises(ConfigError) as e:
        compose_config([*STAGE, f"model.init_from={source}", "model=tiny", "model.n_kv_heads=4"])
    assert str(e.value) == (f"model.init_from={source}: {source}/config.json: n_kv_heads=2, but model.n_kv_heads=4 "
                            f"(model=tiny)")


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)
def test_the_preset_wins_over_the_export_for_the_length_and_the_rope_only(stage):
    source = stage[0]
    run = compose_config(["experiment=extend_context", f"model.init_from={source}"])
    assert run.model.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 4096}
    assert (run.model.max_sequence_length, run.trainer.seq_len) == (32768, 32768)
    assert (run.model.n_layers, run.model.d_model, run.model.rope_theta, run.model.vocab_size) == (4, 128, 5e5, 1024)
    assert (run.optim.lr, run.trainer.global_batch_size * run.trainer.seq_len) == (1e-4, 160 * 32768)


def test_the_refusal_names_the_stage_only_for_context_keys():
    assert refusal("ck", ["trainer.seq_len: 64 -> 128", "model.rope_scaling.factor: None -> 8.0"]).endswith(
        "export this run (python -m pretrain.export) and start a new run_dir with model.init_from "
        "(docs/long_context.md)")
    assert "export this run" in refusal("ck", ["trainer.seq_len: 64 -> 128", "data fingerprint: a -> b (other shards)"])
    assert "export this run" not in refusal("ck", ["data fingerprint: a -> b (other shards in data.dir)"])
    assert refusal("ck", ["trainer.seq_len: 64 -> 128", "seed: 0 -> 1"]).endswith(
        "use another run_dir, or resume=never with a fresh one")
