"""The real entry point under each launcher, on the CPU: DeepSpeed ZeRO-3 with gloo."""

import json
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import BIN, free_port, read_metrics, run_train, train_losses

PYTHON = [sys.executable, "-m", "pretrain.train"]


def assert_learned(run_dir) -> None:
    """The cross-entropy per masked token falls. Not the ELBO-weighted loss: it swings with each step's
    keyed draw of t (a step of mostly small t has a low loss whatever the model knows)."""
    ce = {r["step"]: r["masked_ce"] for r in read_metrics(run_dir) if "masked_ce" in r}
    steps = sorted(ce)
    first, last = ce[steps[0]], sum(ce[s] for s in steps[-3:]) / 3
    assert last < first - 0.3, f"masked_ce did not fall: first {first:.3f}, last three {last:.3f}"


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, demo_shards):
    run_dir = tmp_path_factory.mktemp("runs") / "single"
    extensions = tmp_path_factory.mktemp("torch_extensions")
    proc = run_train(PYTHON, run_dir, demo_shards, "trainer.max_steps=24", "trainer.eval_every=12",
                     "sample.at_end=true", "sample.gen_length=8", "sample.steps=4",
                     env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    return run_dir, proc, extensions


def test_the_cpu_path_builds_no_cpp_op(single_run):
    # DeepSpeed's shared-memory all-reduce would be compiled with gcc into the extensions folder (~150 s).
    _, _, extensions = single_run
    assert list(extensions.iterdir()) == []


def test_the_model_trains_in_the_precision_asked_for(single_run, tmp_path, demo_shards):
    from pretrain.engine.device import resolve_precision

    auto = resolve_precision("auto", "cpu")  # fp32 on this CPU unless it has native bf16
    setup = json.loads((single_run[0] / "setup.json").read_text())
    dtypes = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}
    assert (setup["precision"], setup["param_dtype"]) == (auto, dtypes[auto])
    other = "bf16" if auto == "fp32" else "fp32"
    run_train(PYTHON, tmp_path / "other", demo_shards, "trainer.max_steps=1", f"trainer.precision={other}")
    setup = json.loads((tmp_path / "other" / "setup.json").read_text())
    assert setup["param_dtype"] == dtypes[other]
    # Not the same numbers in another precision (DeepSpeed 0.19 on the CPU once built bf16 either way).
    assert train_losses(tmp_path / "other")[1] != train_losses(single_run[0])[1]


def test_progress_shows_the_first_step_at_once_then_step_of_max_and_eta(tmp_path, demo_shards):
    proc = run_train(PYTHON, tmp_path / "r", demo_shards, "trainer.max_steps=4", "trainer.log_every=3",
                     "model.vocab_size=null")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 1/4", "step 3/4", "step 4/4"]
    assert all(" | ETA 0:" in line for line in lines)
    # model.vocab_size=null: the vocabulary of the shards, recorded in config.yaml.
    assert OmegaConf.load(tmp_path / "r" / "config.yaml").model.vocab_size == 1024


def test_shards_that_do_not_fit_the_model_are_refused_before_deepspeed_starts(tmp_path, demo_shards):
    # Rank 0 of a 2-rank job whose rank 1 never comes: joining the process group would wait for it
    # (cluster.timeout_s=600 > this test's timeout), so only a check made before that can answer.
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = run_train(PYTHON, tmp_path / "r", demo_shards, "trainer.max_steps=1", "model.vocab_size=512",
                     "cluster.timeout_s=600", check=False, env=env, timeout=120)
    assert proc.returncode == 2 and "vocab_size=1024 exceeds model.vocab_size=512" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_the_paper_schedule_on_a_short_run_warns(tmp_path, demo_shards):
    proc = run_train(PYTHON, tmp_path / "r", demo_shards, "trainer.max_steps=1", "optim.schedule.unit=tokens",
                     "optim.schedule.points=[[0,0],[1.048576e10,1]]")  # the paper's warmup
    assert "warning: optim.schedule.points reach 1% of the peak lr" in proc.stderr


def test_a_run_that_ends_before_its_attention_is_open_warns(tmp_path, demo_shards):
    proc = run_train(PYTHON, tmp_path / "r", demo_shards, "trainer.max_steps=2", "model.attention_anneal_steps=8")
    assert ("warning: model.attention_anneal_steps=8 is beyond the run's last step (2): it ends with 25% of the "
            "future positions open") in proc.stderr


def test_single_process_trains_and_writes_the_run_directory(single_run):
    run_dir, proc, _ = single_run
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 25))
    for r in records:
        assert set(r) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens"}
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["tokens"] == r["step"] * 8 * 64
    assert records[0]["lr"] == pytest.approx(3e-3 * (0.1 + 0.9 / 5))  # lr after the first step of the schedule
    assert_learned(run_dir)
    evals = [r["eval/loss"] for r in read_metrics(run_dir) if "eval/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.model.name == "tiny" and saved.trainer.max_steps == 24 and saved.run_dir == str(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000024"
    assert (run_dir / "checkpoints" / "step00000024" / "trainer_state_rank0.json").is_file()
    assert "sample: " in proc.stdout


def test_wandb_writes_offline_run_files(single_run):
    run_dir, _, _ = single_run
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no .wandb event file in the offline run"


def test_resume_continues_exactly(tmp_path, demo_shards):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(PYTHON, straight, demo_shards, "trainer.max_steps=6", "trainer.ckpt_every=3")
    run_train(PYTHON, split, demo_shards, "trainer.max_steps=3")
    proc = run_train(PYTHON, split, demo_shards, "trainer.max_steps=6")
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    a, b = train_losses(straight), train_losses(split)
    assert sorted(b) == list(range(1, 7))
    for step in range(4, 7):  # the same data, masks and optimizer state after the resume
        assert b[step] == pytest.approx(a[step], rel=1e-6), (step, a[step], b[step])


def test_resume_never_refuses_to_overwrite_checkpoints(tmp_path, demo_shards):
    run_train(PYTHON, tmp_path / "r", demo_shards, "trainer.max_steps=1")
    proc = run_train(PYTHON, tmp_path / "r", demo_shards, "trainer.max_steps=1", "resume=never", check=False)
    assert proc.returncode == 2 and "already has checkpoints" in proc.stderr
    assert (tmp_path / "r" / "checkpoints" / "step00000001").is_dir()


def test_manifest_that_does_not_fit_the_run_is_refused(tmp_path, demo_shards):
    proc = run_train(PYTHON, tmp_path / "r", demo_shards, "trainer.max_steps=1", "trainer.seq_len=128", check=False)
    assert proc.returncode == 2
    assert f"{demo_shards}/manifest.json: seq_len=64 but trainer.seq_len=128" in proc.stderr


def two_process_run(launcher, run_dir, demo_shards, steps, *overrides):
    # Persistence threshold 0: ZeRO-3 partitions even the small parameters of the tiny model.
    proc = run_train(launcher, run_dir, demo_shards, f"trainer.max_steps={steps}",
                     "deepspeed.zero_optimization.stage3_param_persistence_threshold=0", *overrides, timeout=600)
    setup = json.loads((run_dir / "setup.json").read_text())
    assert setup["world_size"] == 2
    setup["stdout"] = proc.stdout
    return setup


def test_deepspeed_launcher_two_ranks_partition_the_model(tmp_path, demo_shards):
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29611", "--module", "pretrain.train"]
    setup = two_process_run(launcher, tmp_path / "ds", demo_shards, steps=20)
    total, per_rank = setup["params"], setup["local_params_per_rank"]
    # Each rank holds its half of every parameter (ZeRO-3 pads each one to a multiple of the world size).
    assert len(per_rank) == 2 and all(total / 2 <= n <= total / 2 + 64 * 2 for n in per_rank)
    assert_learned(tmp_path / "ds")
    assert sorted((tmp_path / "ds" / "checkpoints" / "step00000020").glob("trainer_state_rank*.json"))[-1].name \
        == "trainer_state_rank1.json"


def test_torchrun_two_ranks(tmp_path, demo_shards):
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29612", "-m", "pretrain.train"]
    # The in-run sample with a threshold and a cache: three prompts dealt out to the two ranks (rank 0 a
    # left-padded batch of two); each block ends when the ranks agree that all of theirs are decoded.
    prompts = ["The", "Return a new list containing all items", "If"]
    setup = two_process_run(launcher, tmp_path / "tr", demo_shards, 3, "sample.at_end=true", "sample.gen_length=8",
                            "sample.steps=8", "sample.block_length=4", "sample.threshold=0.02", "sample.cache=dual",
                            "sample.prompt=[" + ",".join(f"'{p}'" for p in prompts) + "]")
    assert sum(setup["local_params_per_rank"]) >= setup["params"]
    assert sorted(train_losses(tmp_path / "tr")) == [1, 2, 3]
    samples = [line for line in setup["stdout"].splitlines() if line.startswith("sample: '")]
    assert [s.removeprefix("sample: '").startswith(p) for s, p in zip(samples, prompts, strict=False)] == [True] * 3
    passes = setup["stdout"].split("sample: passes per rank (needed by its own prompts/made): ")[1].splitlines()[0]
    (needed0, made0), (needed1, made1) = [map(int, p.split("/")) for p in passes.split(", ")]
    assert made0 == made1 == max(needed0, needed1) and 2 <= made0 <= 8  # 2 blocks, at most steps passes


def test_hydra_sweep_gives_each_job_its_own_run_dir(tmp_path, demo_shards):
    import subprocess

    from tests.conftest import TRAIN_ARGS, child_env

    cmd = [*PYTHON, "-m", *TRAIN_ARGS, f"data.dir={demo_shards}", "trainer.max_steps=1", "seed=1,2",
           f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(sweeps) == 1 and "seed" not in sweeps[0].name  # the overrides the jobs share
    runs = sorted(sweeps[0].iterdir())
    assert [r.name for r in runs] == ["seed-1", "seed-2"]  # named by what differs, no shell quoting needed
    assert sorted(OmegaConf.load(r / "config.yaml").seed for r in runs) == [1, 2]
    losses = [train_losses(r)[1] for r in runs]
    assert losses[0] != losses[1]  # different seeds, different initial weights and masks
    # the table after the last job: each job's run_dir, status, last step and final loss
    table = proc.stdout[proc.stdout.index("sweep: 2 jobs"):].splitlines()[1:4]
    assert table[0].split() == ["run_dir", "status", "step", "loss", "eval/loss"]
    for line, run, loss in zip(table[1:], runs, losses, strict=True):
        assert line.split() == [str(run.relative_to(tmp_path)), "completed", "1", f"{loss:.4f}", "-"]


def test_data_error_stops_every_rank(tmp_path, demo_shards):
    # Rank 0 finds the shards were built with another vocabulary; rank 1 must stop too, not hang.
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29613", "-m", "pretrain.train"]
    proc = run_train(launcher, tmp_path / "bad", demo_shards, "trainer.max_steps=1", "data.vocab_size=2048",
                     timeout=240, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("was built with data.vocab_size=1024, this run has data.vocab_size=2048") == 2


def test_a_run_dir_is_removed_only_when_empty_and_a_gone_one_is_no_error(tmp_path):
    # Every rank with a config or data error removes the run_dir Hydra made; the first one wins.
    from pretrain.train import remove_if_empty

    (tmp_path / "empty").mkdir()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("{}\n")
    for name in ("empty", "empty", "used", "never-made"):
        remove_if_empty(str(tmp_path / name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]
    assert (tmp_path / "used" / "metrics.jsonl").read_text() == "{}\n"


def test_resume_with_more_loader_workers_continues(tmp_path, demo_shards):
    # The data stream re-plans for the new worker count instead of refusing the checkpoint.
    run_train(PYTHON, tmp_path / "r", demo_shards, "trainer.max_steps=2")
    proc = run_train(PYTHON, tmp_path / "r", demo_shards, "trainer.max_steps=4", "data.num_workers=2")
    assert "at step 2" in proc.stdout and sorted(train_losses(tmp_path / "r")) == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def sft_shards(tmp_path_factory, demo_shards):
    from data_pipeline.build import build
    from tests.conftest import build_config, data_config

    root = tmp_path_factory.mktemp("sft")
    pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(400)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    build(data_config(root / "shards", [str(root / "pairs.jsonl")], format="sft",
                      tokenizer=str(demo_shards / "tokenizer.json")), build_config())
    return root


def test_conditional_objective_trains_on_sft_shards(tmp_path, sft_shards, demo_shards):
    data = ["data=files", f"data.inputs=[{sft_shards / 'pairs.jsonl'}]", "data.format=sft",
            f"data.tokenizer={demo_shards / 'tokenizer.json'}", "data.num_workers=0"]
    run_train(PYTHON, tmp_path / "sft", sft_shards / "shards", *data, "mask=conditional", "mask.random_length_prob=0",
              "trainer.max_steps=3", "trainer.eval_every=3")
    records = read_metrics(tmp_path / "sft")
    assert sorted(train_losses(tmp_path / "sft")) == [1, 2, 3]
    assert all(0 < r["loss"] < 20 for r in records if "loss" in r) and any("eval/loss" in r for r in records)
    # Text shards carry no prompt lengths: the conditional objective refuses them before training.
    proc = run_train(PYTHON, tmp_path / "text", demo_shards, "mask=conditional", "mask.random_length_prob=0",
                     "trainer.max_steps=1", check=False)
    assert proc.returncode == 2 and "carry no prompt lengths" in proc.stderr
