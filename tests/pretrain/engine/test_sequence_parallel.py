"""Ulysses sequence parallelism (cluster.sequence_parallel, pretrain/engine/sequence_parallel.py) on 2 CPU
ranks: gloo does the all-to-all. Split sequences must train exactly as whole ones: the same loss and
gradients at the same global batch (fp32), for plain, packed (document mask) and block diffusion
batches, in the model and through the real entry point under ZeRO-3; a resume at the same size is exact.
What cannot be split is refused in one line before any work."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pretrain.checks import compose_config
from pretrain.config import ConfigError
from tests.conftest import BIN, REPO, child_env, free_port, read_metrics, run_train

HERE = Path(__file__).parent


# -- the limits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "world", "message"), [
    (["cluster.sequence_parallel=2"], 3,
     "cluster.sequence_parallel=2 does not divide the world size 3: each group of 2 ranks splits its sequences"),
    (["cluster.sequence_parallel=4"], 4,  # tiny: 4 heads, 2 kv heads
     "cluster.sequence_parallel=4 does not divide model.n_kv_heads=2 (model=tiny): each rank of a group attends "
     "with 1/4 of the key/value heads"),
    (["cluster.sequence_parallel=2", "model.n_heads=3", "model.n_kv_heads=3", "model.d_model=192"], 2,
     "cluster.sequence_parallel=2 does not divide model.n_heads=3 (model=tiny): each rank of a group attends with "
     "1/2 of the heads"),
    (["cluster.sequence_parallel=2", "trainer.seq_len=33", "data.seq_len=33", "model.n_kv_heads=4"], 2,
     "cluster.sequence_parallel=2 does not divide trainer.seq_len=33: each rank holds 1/2 of every sequence"),
    (["cluster.sequence_parallel=2", "model=tiny_moe", "model.vocab_size=1024"], 2,
     "cluster.sequence_parallel=2 with model.moe: DeepSpeed's expert parallelism (AutoEP) under ZeRO-3 does not "
     "combine with sequence parallelism"),
    (["cluster.sequence_parallel=2", "model.shift_prediction=true"], 2,
     "cluster.sequence_parallel=2 with model.shift_prediction=true: the shift would cross the ranks' slices"),
    (["cluster.sequence_parallel=2", "deepspeed.zero_optimization.stage=2"], 2,
     "cluster.sequence_parallel=2 needs ZeRO stage 3"),
    (["cluster.sequence_parallel=2", "+deepspeed.zero_optimization.reduce_scatter=false"], 2,
     "cluster.sequence_parallel=2 with deepspeed.zero_optimization.reduce_scatter=false"),
    (["cluster.sequence_parallel=0"], 1, "cluster.sequence_parallel=0 must be at least 1"),
])
def test_what_cannot_be_split_is_refused_in_one_line(overrides, world, message):
    with pytest.raises(ConfigError) as e:
        compose_config(overrides, world_size=world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_batch_math_counts_data_parallel_groups_not_ranks():
    # 4 ranks in groups of 2: 2 data-parallel ranks; 8 = 2 micro x 2 groups x 2 accumulation steps
    run = compose_config(["cluster.sequence_parallel=2", "trainer.micro_batch_size=2", "trainer.global_batch_size=8"],
                         world_size=4)
    from pretrain.engine.build import deepspeed_config
    from pretrain.engine.sequence_parallel import Layout, data_parallel_size

    assert data_parallel_size(run, 4) == 2
    assert deepspeed_config(run, data_parallel_size(run, 4))["gradient_accumulation_steps"] == 2
    assert [Layout.of(run, r, 4) for r in range(4)] == [Layout(2, 0, 0, 2), Layout(2, 1, 0, 2), Layout(2, 0, 1, 2),
                                                        Layout(2, 1, 1, 2)]
    with pytest.raises(ConfigError) as e:  # 6 % (2 x 2)
        compose_config(["cluster.sequence_parallel=2", "trainer.micro_batch_size=2", "trainer.global_batch_size=6"],
                       world_size=4)
    assert str(e.value) == ("trainer.global_batch_size=6 is not divisible by trainer.micro_batch_size=2 x 2 "
                            "data-parallel ranks (world size 4 / cluster.sequence_parallel=2) = 4")


# -- exact in the model: 2 ranks, DistributedAttention over gloo ---------------------------------------
@pytest.fixture(scope="module")
def model_cases():
    import subprocess

    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "sp_exactness.py")]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("case", ["plain", "packed", "block", "block_packed"])
def test_split_sequences_give_the_whole_sequences_loss_and_gradients(model_cases, case):
    r = model_cases[case]
    assert r["hidden_len"] == 32  # each rank really held half of the 64 tokens (the noisy half's slice, for block)
    assert r["split"] == pytest.approx(r["whole"], rel=1e-6)
    assert abs(r["part"] - r["whole"] / 2) > 1e-3  # one slice's share is not the loss: the group's sum is
    assert r["grad_err"] <= 1e-5 * r["grad_max"], r
    assert r["masked"] == r["masked_want"]  # the statistics the metrics log, added up over the group


@pytest.mark.parametrize("case", ["block", "block_packed"])
def test_flex_attention_under_sp_builds_its_block_mask_in_the_gathered_order(model_cases, case):
    # forward only on the CPU (FlexAttention's backward needs a GPU): the split loss through FlexAttention's
    # BlockMask equals the whole sequences' through the dense mask
    r = model_cases[case]
    assert r["flex_split"] == pytest.approx(r["whole"], rel=1e-5)


def test_the_document_mask_and_the_block_pattern_are_kept_when_split(model_cases):
    # the four cases differ from each other by more than the split differs from the whole: a split that lost
    # the documents or the block pattern would fail the test above
    whole = [model_cases[c]["whole"] for c in ("plain", "packed", "block", "block_packed")]
    assert min(abs(a - b) for i, a in enumerate(whole) for b in whole[i + 1:]) > 1e-4


# -- exact through the entry point: ZeRO-3, SP 2 against SP 1 at the same global batch and data layout --
STEPS = 3
COMMON = ["trainer.precision=fp32", "mask.random_length_prob=0", f"trainer.max_steps={STEPS}", "logging.mode=disabled"]
BLOCK_PACKED = ["block.size=16", "model.document_mask=true"]


@pytest.fixture(scope="session")
def sp_runs(tmp_path_factory, demo_shards):
    """{name: run_dir}: plain, SP 1 on 2 ranks against SP 2 on 4 (2 data-parallel ranks either way: the same
    sequences on each, 1 micro-batch of 4 per step; the 4 ranks are 2 groups of 2, ZeRO-3 over all 4);
    block+packed, SP 1 on 1 rank against SP 2 on 2 (1 group, 2 accumulation steps of 4); and a copy of the
    plain SP 2 run resumed from its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("sp")

    def ranks(n: int) -> list[str]:
        return [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(free_port()), "-m",
                "pretrain.train"]

    runs = {}
    for name, world, extra in (("plain", 2, ["trainer.eval_every=2"]), ("block_packed", 1, BLOCK_PACKED)):
        runs[f"{name}_sp1"] = root / f"{name}_sp1"
        run_train(ranks(world), runs[f"{name}_sp1"], demo_shards, *COMMON, *extra, timeout=600)
        runs[f"{name}_sp2"] = root / f"{name}_sp2"
        run_train(ranks(2 * world), runs[f"{name}_sp2"], demo_shards, *COMMON, *extra, "cluster.sequence_parallel=2",
                  "trainer.ckpt_every=2", timeout=600)
    resumed = runs["resumed_sp2"] = root / "resumed_sp2"
    shutil.copytree(runs["plain_sp2"], resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step{STEPS:08d}")
    (resumed / "metrics.jsonl").unlink()
    proc = run_train(ranks(4), resumed, demo_shards, *COMMON, "cluster.sequence_parallel=2", "trainer.ckpt_every=2",
                     timeout=600)
    assert "at step 2" in proc.stdout
    return runs


def steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.parametrize("name", ["plain", "block_packed"])
def test_sp2_trains_as_sp1_under_zero3(sp_runs, name):
    sp1, sp2 = steps(sp_runs[f"{name}_sp1"]), steps(sp_runs[f"{name}_sp2"])
    assert sorted(sp1) == sorted(sp2) == list(range(1, STEPS + 1))
    for s in sp1:
        # the gradient norm is the whole gradient's (one averaged over data-parallel ranks, not over all ranks),
        # and the losses after the first step follow from the updates it made
        for key in ("loss", "grad_norm", "masked_ce", "masked_acc"):
            assert sp2[s][key] == pytest.approx(sp1[s][key], rel=1e-5, abs=1e-7), (s, key, sp1[s], sp2[s])
        assert sp2[s]["tokens"] == sp1[s]["tokens"]
        # throughput counts each sequence once, not once per rank of its group: tokens/s x s/step = tokens/step
        assert sp2[s]["tokens_per_s"] * sp2[s]["step_time_s"] == pytest.approx(8 * 64)
    worlds = [json.loads((sp_runs[f"{name}_sp{n}"] / "setup.json").read_text())["world_size"] for n in (1, 2)]
    assert worlds == ([2, 4] if name == "plain" else [1, 2])


def test_the_periodic_eval_under_sp2_scores_as_sp1(sp_runs):
    # evaluation runs whole sequences on every rank of a group; the group's copies count once
    evals = [{r["step"]: (r["eval/loss"], r["eval/loss_se"]) for r in read_metrics(sp_runs[f"plain_sp{n}"])
              if "eval/loss" in r} for n in (1, 2)]
    assert sorted(evals[0]) == sorted(evals[1]) == [2, 3]
    for step, (loss, se) in evals[0].items():
        assert evals[1][step] == pytest.approx((loss, se), rel=1e-6)


def test_a_resume_at_the_same_sp_size_gives_the_uninterrupted_losses(sp_runs):
    straight, resumed = steps(sp_runs["plain_sp2"]), steps(sp_runs["resumed_sp2"])
    assert sorted(resumed) == [STEPS]
    assert resumed[STEPS]["loss"] == straight[STEPS]["loss"]
    assert resumed[STEPS]["grad_norm"] == straight[STEPS]["grad_norm"]


def test_a_resume_at_another_sp_size_loads_every_shard_and_reads_the_rest_of_the_data(sp_runs, demo_shards, tmp_path):
    """SP 2 (2 groups of 2 on 4 ranks) resumed at SP 1 on the same 4 ranks (4 data-parallel ranks of micro-batch
    2, the same global batch): at lr 1e-30 a step changes no fp32 weight, so the weights saved after it are
    exactly the ones loaded; the lr schedule continues, the loss is close (other sequences per rank after the
    stream's re-plan: close, not equal)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = tmp_path / "other"
    saved = sp_runs["plain_sp2"] / "checkpoints" / "step00000002"
    shutil.copytree(saved, run_dir / "checkpoints" / saved.name)
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "4", "--master_port", str(free_port()), "-m",
                "pretrain.train"]
    proc = run_train(launcher, run_dir, demo_shards, *COMMON, "trainer.micro_batch_size=2", "optim.lr=1e-30")
    assert "resume: cluster.sequence_parallel 2 -> 1" in proc.stdout and "at step 2" in proc.stdout
    weights = [get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints" if n else saved.parent), tag=tag)
               for n, tag in ((0, saved.name), (1, f"step{STEPS:08d}"))]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    straight, got = steps(sp_runs["plain_sp2"]), steps(run_dir)
    assert sorted(got) == [STEPS]
    base_lr = yaml.safe_load((sp_runs["plain_sp2"] / "config.yaml").read_text())["optim"]["lr"]
    assert got[STEPS]["lr"] / 1e-30 == pytest.approx(straight[STEPS]["lr"] / base_lr, rel=1e-5)  # the schedule goes on
    assert abs(got[STEPS]["loss"] - straight[STEPS]["loss"]) < 0.3
