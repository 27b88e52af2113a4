"""The speed and memory options through the real engine: DeepSpeed ZeRO-3 on the CPU, two ranks (gloo).

Each option must leave training's numbers unchanged: the same losses step for step as the run
without it (fp32, same seed, same data)."""

import os
import sys

import pytest

from pretrain.checks import compose_config
from pretrain.engine.build import OPTIMIZERS, deepspeed_config, world_size_from_env
from tests.conftest import BIN, read_metrics, run_train, train_losses

TORCHRUN = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29631", "-m", "pretrain.train"]
STEPS = 4
# An FFN width that is not a multiple of 64 (so the padded path runs) and 2 ranks of ZeRO-3.
COMMON = (f"trainer.max_steps={STEPS}", "model.mlp_hidden_size=330", "data.num_workers=0", "trainer.precision=fp32")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, demo_shards):
    run_dir = tmp_path_factory.mktemp("engine") / "baseline"
    run_train(TORCHRUN, run_dir, demo_shards, *COMMON)
    return train_losses(run_dir)


def train_on_port(port: int, tmp_path, demo_shards, *overrides: str, env: dict | None = None) -> dict[int, float]:
    """A 2-rank run of COMMON plus `overrides` on its own rendezvous port; its losses by step."""
    launcher = TORCHRUN[:-4] + ["--master_port", str(port), "-m", "pretrain.train"]
    run_train(launcher, tmp_path / "run", demo_shards, *COMMON, *overrides, env=env)
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def assert_same_losses(losses: dict[int, float], baseline: dict[int, float], rel: float = 1e-5,
                       abs_tol: float | None = 1e-6) -> None:
    for step, loss in baseline.items():
        assert losses[step] == pytest.approx(loss, rel=rel, abs=abs_tol), (step, losses, baseline)


def test_activation_checkpointing_under_zero3_gives_the_same_losses(tmp_path, demo_shards, baseline):
    # Every 2nd block: checkpointed and plain blocks in one model (`full` is k=1 of the same code).
    assert_same_losses(train_on_port(29631, tmp_path, demo_shards, "trainer.activation_checkpointing=2"), baseline)


def test_compiled_blocks_and_loss_under_zero3_give_the_same_losses(tmp_path, demo_shards, baseline):
    # trainer.compile with inductor's CPU kernels (the GPU default path, here in fp32): each rank
    # compiles the block graph and the loss's two chunk functions once.
    cache = tmp_path / "inductor"  # a fresh cache: inductor really compiled (no kernel is reused from elsewhere)
    losses = train_on_port(29634, tmp_path, demo_shards, "trainer.compile=true",
                            env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert len(list(cache.rglob("*.py"))) >= 3, "inductor wrote no kernels: the run was not compiled"
    assert_same_losses(losses, baseline, rel=1e-4, abs_tol=None)


def test_torch_linear_gives_deepspeed_s_memory_efficient_linear_losses(tmp_path, demo_shards, baseline):
    # conf/deepspeed/zero3.yaml keeps torch's F.linear (memory_efficient_linear: false); DeepSpeed's
    # default replaces it with its own autograd function. Both must train the same, step for step.
    assert deepspeed_config(compose_config([]), 1)["zero_optimization"]["memory_efficient_linear"] is False
    losses = train_on_port(29633, tmp_path, demo_shards, "deepspeed.zero_optimization.memory_efficient_linear=true")
    assert_same_losses(losses, baseline)


def test_document_mask_trains_under_zero3(tmp_path, demo_shards, baseline):
    # The demo's documents (~2k tokens) span many 64-token windows, so most windows hold one document
    # and the losses stay near the baseline's; the mask's numerics are tested on the model itself.
    losses = train_on_port(29632, tmp_path, demo_shards, "model.document_mask=true", "trainer.eval_every=2")
    assert all(abs(losses[s] - baseline[s]) < 0.05 * baseline[s] for s in losses)
    # The periodic eval passes the documents and the masked rows through the engine's forward under ZeRO-3
    # (that the scores then stay within documents is tested in test_likelihood / test_evaluate).
    evals = [r["eval/loss"] for r in read_metrics(tmp_path / "run") if "eval/loss" in r]
    assert len(evals) == 2 and all(0 < e < 10 for e in evals)


def test_optimizer_is_picked_by_name_and_unknown_names_are_refused():
    assert set(OPTIMIZERS) == {"torch", "deepspeed_fused"}
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="optim.impl='adamw8bit'"):
        compose_config(["optim.impl=adamw8bit"])


def test_bad_activation_checkpointing_value_is_refused():
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="trainer.activation_checkpointing='some'"):
        compose_config(["trainer.activation_checkpointing=some"])


def test_zero3_sizes_follow_the_model_unless_set():
    small, big = compose_config(["model=tiny"]), compose_config(["model=llada_8b"])
    z_small = deepspeed_config(small, 1)["zero_optimization"]
    z_big = deepspeed_config(big, 1)["zero_optimization"]
    # llada_8b: one block is 4 x 4096^2 (attention) + 3 x 4096 x 12288 (SwiGLU) + 2 x 4096 (norms).
    assert z_big["stage3_prefetch_bucket_size"] == 4 * 4096**2 + 3 * 4096 * 12288 + 2 * 4096
    assert z_big["reduce_bucket_size"] == z_big["stage3_prefetch_bucket_size"]
    assert z_big["stage3_param_persistence_threshold"] == 40960 > z_small["stage3_param_persistence_threshold"]
    fixed = compose_config(["deepspeed.zero_optimization.reduce_bucket_size=12345"])
    assert deepspeed_config(fixed, 1)["zero_optimization"]["reduce_bucket_size"] == 12345

def test_the_cpu_engine_counts_its_numa_nodes_once_not_per_gradient_bucket(tmp_path, demo_shards):
    # DeepSpeed's CPU accelerator runs `numactl --hardware` on every device_count() call, and ZeRO-3
    # calls it for every gradient bucket (a fork per block per micro-batch). A numactl on PATH that
    # logs each call counts them.
    shim, log = tmp_path / "bin" / "numactl", tmp_path / "numactl.log"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\necho call >> {log}\nexit 1\n")
    shim.chmod(0o755)
    run_train([sys.executable, "-m", "pretrain.train"], tmp_path / "run", demo_shards, *COMMON,
              env={"PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"})
    assert sorted(train_losses(tmp_path / "run")) == list(range(1, STEPS + 1))
    calls = len(log.read_text().splitlines())
    assert 1 <= calls <= 2, f"numactl ran {calls} times in {STEPS} steps"


# The ranks' identity when srun starts them without a launcher.

def test_ranks_started_by_srun_take_their_ids_from_slurm(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # world_size_from_env sets them: restored after the test
        monkeypatch.setenv(key, "")  # (a delenv of an absent key records nothing, and WORLD_SIZE=16 leaked)
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    assert world_size_from_env() == 16
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "16", "1")


def test_a_launcher_s_ranks_win_over_slurm_task_ids(monkeypatch):
    # Under srun + deepspeed/torchrun, SLURM_PROCID is the node's launcher task; RANK is the rank.
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    assert world_size_from_env() == 4 and os.environ["RANK"] == "3"
