"""Shared fixtures: a small demo corpus on disk, and a helper that runs the real training entry point."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.build import build
from data_pipeline.config import BuildConfig, DataConfig

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SEQ_LEN = 64


def data_config(directory: Path, inputs=("demo",), seq_len: int = SEQ_LEN, **overrides) -> DataConfig:
    fields = dict(inputs=list(inputs), dir=str(directory), format="text", text_field="text", prompt_field="prompt",
                  response_field="response", tokenizer=None, vocab_size=1024, seq_len=seq_len, shard_bytes=16_384,
                  member_bytes=2048, heldout_fraction=0.05, on_decode_error="replace", shuffle_buffer=64,
                  num_workers=0, url=None, on_corrupt="error", batches_per_item=1)
    return DataConfig(**{**fields, **overrides})


def demo_data_config(directory: Path, seq_len: int = SEQ_LEN, **overrides) -> DataConfig:
    return data_config(directory, ("demo",), seq_len, **overrides)


def build_config(workers: int = 1, task: int = 0, tasks: int = 1, merge: bool = True) -> BuildConfig:
    return BuildConfig(workers=workers, task=task, tasks=tasks, merge=merge, progress=False, progress_every_s=0)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """The demo corpus as some 20 shards of 64-token windows, 16 windows per tar member (built once)."""
    directory = tmp_path_factory.mktemp("data") / "demo-64"
    build(demo_data_config(directory), build_config())
    return directory


def free_port() -> int:
    """A free TCP port on loopback, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(WANDB_MODE="offline", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


# Small and fast: the tiny model at seq 64, a short warmup, logs and checkpoints at every step.
TRAIN_ARGS = ["model=tiny", "model.vocab_size=1024", "data.vocab_size=1024", f"trainer.seq_len={SEQ_LEN}",
              "trainer.micro_batch_size=4",
              "trainer.global_batch_size=8", "trainer.log_every=1", "mask.random_length_prob=0.01",
              "optim.lr=3e-3", "optim.schedule.unit=steps", "optim.schedule.points=[[0,0.1],[5,1.0]]"]


def run_train(launcher: list[str], run_dir: Path, data_dir: Path, *overrides: str, timeout: int = 300,
              check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [*launcher, *TRAIN_ARGS, f"data.dir={data_dir}", f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env={**child_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def rss_growth_mb(script: str, timeout: int = 300) -> float:
    """Runs `script` (which prints one number: its resident memory growth in MB) in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=timeout, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


# Every GPU run trains in bf16, and so does `auto` on a CPU with native bf16; CI's CPU may have none
# (auto = fp32 there). Tests that write or read checkpoints force each precision, whatever the host.
PRECISIONS = ("fp32", "bf16")


@pytest.fixture(scope="session", params=PRECISIONS)
def trained_run(request, tmp_path_factory, demo_shards) -> Path:
    """A tiny model trained 30 steps on the demo shards, one process, in each precision (for export,
    evaluate, generate); its precision is `trainer.precision` in the run's config.yaml."""
    run_dir = tmp_path_factory.mktemp(f"trained-{request.param}") / "run"
    run_train([sys.executable, "-m", "pretrain.train"], run_dir, demo_shards, "trainer.max_steps=30",
              "trainer.ckpt_every=15", "logging.mode=disabled", f"trainer.precision={request.param}")
    return run_dir


def run_precision(run_dir: Path) -> str:
    """The precision a run trained in ("fp32" or "bf16"), from its config.yaml."""
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["precision"]


# A run with every monitoring option set, resumed once (tests/pretrain/monitor/test_metrics.py, test_report.py).
MONITOR_PEAK_TFLOPS = 0.5  # a CPU has no entry in the peak table: MFU needs cluster.peak_tflops
MONITOR_ARGS = ["logging.group=monitor-test", "logging.tags=[cpu,tiny]", "logging.name=watched", "logging.t_buckets=4",
                f"cluster.peak_tflops={MONITOR_PEAK_TFLOPS}", "trainer.eval_every=2"]


@pytest.fixture(scope="session")
def resumed_run(tmp_path_factory, demo_shards):
    """Steps 1-2, then the same command resumed to step 4: (run_dir, both processes' stdout)."""
    run_dir = tmp_path_factory.mktemp("monitor") / "watched"
    train = [sys.executable, "-m", "pretrain.train"]
    first = run_train(train, run_dir, demo_shards, "trainer.max_steps=2", *MONITOR_ARGS)
    second = run_train(train, run_dir, demo_shards, "trainer.max_steps=4", *MONITOR_ARGS)
    assert "at step 2" in second.stdout
    return run_dir, first.stdout + second.stdout


# A tiny block-diffusion model (docs/block_diffusion.md): block 4 for steps 1-2, then 16
# (tests/pretrain/test_block_train.py, and the export / generate of a block model).
BLOCK_ARGS = ["block.schedule={unit:steps,points:[[0,4],[2,16]]}", "trainer.precision=fp32", "trainer.ckpt_every=2",
              "deepspeed.zero_optimization.stage3_param_persistence_threshold=0", "trainer.max_steps=4"]


# The resumed block run ends with the in-run sample, two prompts on two ranks, with a threshold so low
# that each piece takes one pass, and the exact cache: the short prompt needs fewer passes than the other.
BLOCK_SAMPLE_PROMPTS = ["The", "one two three four five"]  # 1 and 11 demo tokens: 1 piece, 2 pieces
BLOCK_SAMPLE_ARGS = ["sample.at_end=true", "sample.gen_length=8", "sample.steps=8", "sample.threshold=1e-9",
                     "sample.cache=block", "sample.prompt=[" + ",".join(f"'{p}'" for p in BLOCK_SAMPLE_PROMPTS) + "]"]


@pytest.fixture(scope="session")
def block_run(tmp_path_factory, demo_shards):
    """Trained straight for 4 steps on 2 ranks under ZeRO-3 (torchrun, fp32; checkpoints at 2 and 4), and
    a copy of it resumed from its step-2 checkpoint, across the block-size change, that ends with the
    in-run sample (BLOCK_SAMPLE_ARGS): (straight, resumed, the resumed process's stdout)."""
    import shutil

    root = tmp_path_factory.mktemp("block")
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                "pretrain.train"]
    straight = root / "straight"
    run_train(torchrun, straight, demo_shards, *BLOCK_ARGS, timeout=600)
    resumed = root / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000004")
    (resumed / "metrics.jsonl").unlink()
    torchrun[4] = str(free_port())
    proc = run_train(torchrun, resumed, demo_shards, *BLOCK_ARGS, *BLOCK_SAMPLE_ARGS, timeout=600)
    return straight, resumed, proc.stdout


# The tiny mixture of experts (conf/model/tiny_moe.yaml) trained 4 steps on 2 ranks under ZeRO-3 in fp32,
# saving at steps 2 and 4 (tests/pretrain/test_moe_train.py, tests/pretrain/hf/test_moe_format.py).
MOE_ARGS = ["model=tiny_moe", "trainer.precision=fp32", "trainer.max_steps=4", "trainer.ckpt_every=2",
            "trainer.keep_last=0"]


@pytest.fixture(scope="session")
def moe_run(tmp_path_factory, demo_shards) -> Path:
    run_dir = tmp_path_factory.mktemp("moe") / "run"
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                "pretrain.train"]
    run_train(launcher, run_dir, demo_shards, *MOE_ARGS)
    return run_dir
