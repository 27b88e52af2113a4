import subprocess
import sys
import time

import pytest

from pretrain.checks import compose_config
from pretrain.config import ConfigError
from tests.conftest import REPO, child_env


@pytest.mark.parametrize("overrides, world_size, message", [
    (["model.d_model=130"], 1, "model.d_model=130 is not divisible by model.n_heads=4"),
    (["model.n_kv_heads=3"], 1, "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
    (["trainer.global_batch_size=20"], 1,
     "trainer.global_batch_size=20 is not divisible by trainer.micro_batch_size=8 x world size 1 = 8"),
    (["trainer.global_batch_size=24"], 2,
     "trainer.global_batch_size=24 is not divisible by trainer.micro_batch_size=8 x world size 2 = 16"),
    (["trainer.seq_len=2048"], 1, "trainer.seq_len=2048 is outside 16..model.max_sequence_length=1024 (model=tiny)"),
    (["trainer.seq_len=3"], 1, "trainer.seq_len=3 is outside 16..model.max_sequence_length=1024 (model=tiny): "
                               "shorter windows hold too little context to learn from"),
    (["+deepspeed.zero_optimisation={stage: 3}"], 1, "deepspeed.zero_optimisation: unknown DeepSpeed config key"),
    (["+deepspeed.zero_optimization.stage3_prefetch_bucket_sizee=1"], 1,
     "deepspeed.zero_optimization.stage3_prefetch_bucket_sizee=1: Extra inputs are not permitted"),
    (["+deepspeed.train_batch_size=64"], 1, "deepspeed.train_batch_size is set from trainer.global_batch_size"),
    (["+model.n_layer=3"], 1, "Key 'n_layer' not in 'ModelConfig'"),
    (["trainer.precision=fp16"], 1, "trainer.precision='fp16' is not one of auto, bf16, fp32"),
    (["mask.eps=0"], 1, "mask.eps=0.0 must be in (0, 1)"),
    (["optim.schedule.points=[[10,1],[0,0]]"], 1, "positions must not decrease"),
    (["sample.at_end=true", "sample.block_length=5"], 1, "sample: gen_length=32 is not divisible by block_length=5"),
    (["optim=wsd_short", "optim.schedule.points=[[0,0],[20,1]]"], 1,
     "with optim.schedule.unit=fraction positions are in [0, 1]"),
    (["mask.schedule=quadratic"], 1, "mask.schedule='quadratic' is not one of linear, cosine, polynomial, loglinear"),
    (["mask=polynomial", "mask.exponent=0"], 1, "mask.exponent=0.0 must be > 0"),
    (["mask.eps=1.5"], 1, "mask.eps=1.5 must be in (0, 1)"),
    (["mask.time_sampling=sobol"], 1, "mask.time_sampling='sobol' is not one of iid, stratified, antithetic"),
    (["mask.normalize=batch"], 1, "mask.normalize='batch' is not one of tokens, masked"),
    (["mask=conditional", "mask.prompt_len=256"], 1, "mask.prompt_len=256 must be in [0, trainer.seq_len=256)"),
    (["mask.prompt_len=8"], 1, "mask.prompt_len=8 is set but mask.conditional=false"),
    (["mask.conditional=true"], 1, "mask.random_length_prob=0.01 with mask.conditional=true would cut"),
    (["trainer.log_every=0"], 1, "trainer.log_every=0 must be positive"),
    (["trainer.max_steps=-5"], 1, "trainer.max_steps=-5 must be positive (or null)"),
    (["trainer.ckpt_every=-1"], 1, "trainer.ckpt_every=-1 must be >= 0 (0 turns it off)"),
    (["optim.lr=nan"], 1, "optim.lr=nan must be a positive number"),
    (["optim.betas=[0.9,1.5]"], 1, "optim.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    (["cluster.timeout_s=0"], 1, "cluster.timeout_s=0.0 must be positive"),
])
def test_validation_errors_name_key_and_value(overrides, world_size, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides, world_size)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_paper_models_compose():
    cfg = compose_config(["model=llada_8b"])
    m = cfg.model
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.mlp_hidden_size, m.vocab_size) == \
           (32, 4096, 32, 32, 12288, 126464)
    m = compose_config(["model=llada_1b"]).model
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.mlp_hidden_size) == (22, 2048, 32, 4, 5634)
    assert m.rope_theta == 500000.0 and m.rms_norm_eps == 1e-5


@pytest.mark.parametrize("name", ["linear", "cosine", "polynomial", "loglinear"])
def test_mask_group_composes(name):
    m = compose_config([f"mask={name}"]).mask
    assert m.schedule == name and m.eps == 1e-3 and m.time_sampling == "iid" and m.normalize == "tokens"


def test_paper_training_defaults():
    cfg = compose_config(["cluster=local_cpu"])
    assert cfg.optim.weight_decay == 0.1 and cfg.optim.lr == 4e-4
    assert cfg.mask.eps == 1e-3 and cfg.mask.random_length_prob == 0.01


def test_train_rejects_bad_config_before_any_work():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "model.d_model=130", "run_dir=/nonexistent/x"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: model.d_model=130 is not divisible by model.n_heads=4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60


def test_shards_that_do_not_fit_the_run_are_refused(demo_shards, tmp_path):
    from data_pipeline.shards import Manifest
    from data_pipeline.tokenizer import train_bpe
    from pretrain.checks import validate_data

    manifest = Manifest.load(demo_shards)
    base = ["model.vocab_size=1024", "trainer.seq_len=64", f"data.dir={demo_shards}"]
    validate_data(compose_config(base), manifest)  # fits
    with pytest.raises(ConfigError, match="seq_len=64 but trainer.seq_len=128"):
        validate_data(compose_config(["model.vocab_size=1024", "trainer.seq_len=128"]), manifest)
    with pytest.raises(ConfigError, match="vocab_size=1024 exceeds model.vocab_size=512"):
        validate_data(compose_config(["model.vocab_size=512", "trainer.seq_len=64"]), manifest)
    other = tmp_path / "other.json"
    train_bpe(["some other text entirely"] * 10, 300).save(str(other))
    with pytest.raises(ConfigError, match="tokenized with another tokenizer than data.tokenizer="):
        validate_data(compose_config([*base, f"data.tokenizer={other}"]), manifest)
    validate_data(compose_config([*base, f"data.tokenizer={demo_shards / 'tokenizer.json'}"]), manifest)


def test_model_vocabulary_comes_from_the_data_unless_fixed(demo_shards):
    from pretrain.checks import resolve_vocab

    run = compose_config(["model=tiny", f"data.dir={demo_shards}", "trainer.seq_len=64"])
    assert run.model.vocab_size is None
    resolve_vocab(run)
    assert run.model.vocab_size == 1024  # the manifest's (padded) vocabulary
    unbuilt = compose_config(["model=tiny", "data.dir=/nonexistent", "data.vocab_size=1000"])
    resolve_vocab(unbuilt)
    assert unbuilt.model.vocab_size == 1024  # what the build would produce: 1000 padded to a multiple of 128
    fixed = compose_config(["model=llada_1b", f"data.dir={demo_shards}"])
    resolve_vocab(fixed)
    assert fixed.model.vocab_size == 126464


def test_config_error_leaves_no_run_dir_behind(tmp_path):
    run_dir = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "trainer.log_every=0", f"run_dir={run_dir}"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "trainer.log_every=0 must be positive" in proc.stderr
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr  # DeepSpeed's CPU-fallback notice, muted
    assert not run_dir.exists()


def test_shards_already_built_need_no_inputs(demo_shards, tmp_path):
    """The README's SLURM example trains on data.dir alone: its manifest says the rest."""
    from data_pipeline.shards import DataError
    from pretrain.train import check_prebuilt_data

    run = compose_config(["data=files", f"data.dir={demo_shards}", "trainer.seq_len=64"])
    assert run.data.inputs == []
    check_prebuilt_data(run)
    assert run.model.vocab_size == 1024  # read from the manifest
    with pytest.raises(DataError, match=f"data.dir={tmp_path} has no manifest.json: build the shards first"):
        check_prebuilt_data(compose_config(["data=files", f"data.dir={tmp_path}", "trainer.seq_len=64"]))
    # without the seq_len it was built with, the one line says which to add
    with pytest.raises(ConfigError, match=r"seq_len=64 but trainer.seq_len=256; add trainer.seq_len=64 to train on"):
        check_prebuilt_data(compose_config(["data=files", f"data.dir={demo_shards}"]))


def test_the_demo_preset_composes_and_trains_in_fp32():
    """make demo's settings (conf/experiment/demo.yaml) pass every check, and fp32 whatever the CPU."""
    run = compose_config(["experiment=demo"])
    assert run.trainer.precision == "fp32" and run.trainer.seq_len == run.data.seq_len == 64
    assert run.optim.schedule.unit == "fraction" and run.sample.at_end and run.sample.block_length == 2
    # it learns locality first, and is LLaDA's bidirectional model well before it ends and samples
    assert run.model.shift_prediction and 0 < run.model.attention_anneal_steps < run.trainer.max_steps
    assert run.run_dir == "outputs/demo"


def test_init_from_a_folder_of_pickled_weights_is_one_line_before_any_work(tmp_path):
    # Refusing pytorch_model.bin is right (unpickling can run code); a traceback after the engine is not.
    import json

    import torch

    from pretrain.hf.format import hf_config

    run = compose_config(["model=tiny", "model.vocab_size=1024"])
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(run.model, 0, 1, torch.float32, None)))
    torch.save({"model.transformer.wte.weight": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ConfigError) as err:
        compose_config(["model=tiny", "model.vocab_size=1024", f"model.init_from={folder}"])
    assert "\n" not in str(err.value)
    assert f"model.init_from={folder}: {folder}: neither model.safetensors nor model.safetensors.index.json; " \
           f"pytorch_model.bin is pickled" in str(err.value)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ConfigError, match="the weights cannot be read"):
        compose_config(["model=tiny", "model.vocab_size=1024", f"model.init_from={folder}"])
