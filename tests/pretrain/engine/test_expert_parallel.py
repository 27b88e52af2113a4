"""Expert parallelism through DeepSpeed's AutoEP (cluster.expert_parallel, pretrain/engine/expert_parallel.py),
against the pure-torch mixture of experts as the reference (the moe_run fixture: model=tiny_moe, 2 ranks,
ZeRO-3, fp32): the same losses, gradient norms, expert loads and biases at EP 2 and at EP 1 (with the
auxiliary and z-losses on), an exact resume at the same EP size, a resume at another through the universal
checkpoint, an export equal to the reference's, and what is refused."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint.zero_files import load_engine_file
from pretrain.checks import compose_config
from pretrain.config import ConfigError
from pretrain.engine import expert_parallel
from pretrain.export import export
from tests.conftest import BIN, MOE_ARGS, free_port, read_metrics, run_train

LAYERS = (1, 2, 3)  # tiny_moe: layer 0 dense
MOE_KEYS = [f"moe_{k}/{layer}" for k in ("load", "idle", "bias") for layer in LAYERS]


def launcher() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "pretrain.train"]


def steps(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


def assert_same_steps(ours: dict, reference: dict, rel: float = 1e-5) -> None:
    assert set(ours) == set(reference)
    for s, r in reference.items():
        for key in ("loss", "grad_norm"):
            assert ours[s][key] == pytest.approx(r[key], rel=rel), (s, key)
        for key in MOE_KEYS:  # integer token counts and a bias moved by +-rate: exactly the reference's
            assert ours[s][key] == pytest.approx(r[key], abs=1e-9), (s, key)


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory, demo_shards):
    """tiny_moe at EP 2 on 2 ranks (4 experts a rank), with a held-out evaluation and the end-of-run sample."""
    run_dir = tmp_path_factory.mktemp("ep2") / "run"
    out = run_train(launcher(), run_dir, demo_shards, *MOE_ARGS, "logging.mode=disabled", "cluster.expert_parallel=2",
                    "trainer.eval_every=2", "sample.at_end=true")
    (run_dir / "stdout.txt").write_text(out.stdout)
    return run_dir


def test_ep2_equals_the_pure_torch_reference(ep2_run, moe_run):
    assert_same_steps(steps(ep2_run), steps(moe_run))
    states = load_engine_file(ep2_run / "checkpoints" / "step00000004" / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    layers = states["ds_autoep_layers"]  # AutoEP's layers, experts 4-7 on rank 1
    assert [x["module_path"] for x in layers] == [f"transformer.blocks.{i}.moe" for i in LAYERS]
    assert {x["ep_size"] for x in layers} == {2}
    assert layers[0]["expert_placement"]["ranks"][1]["experts"] == [4, 5, 6, 7]
    setup = json.loads((ep2_run / "setup.json").read_text())
    assert setup["params"] == json.loads((moe_run / "setup.json").read_text())["params"]  # all experts counted
    stdout = (ep2_run / "stdout.txt").read_text()
    assert "eval loss" in stdout and "\nsample: " in stdout  # evaluation and sampling pass tokens between ranks too


def test_ep1_with_the_auxiliary_and_z_losses_equals_the_reference(tmp_path, demo_shards):
    """EP 1: AutoEP's router and grouped experts, every expert on every rank; the losses computed by the hook."""
    args = [*MOE_ARGS, "logging.mode=disabled", "trainer.max_steps=2", "trainer.ckpt_every=0",
            "model.moe.aux_loss_coef=0.01", "model.moe.z_loss_coef=0.001"]
    run_train(launcher(), tmp_path / "ref", demo_shards, *args)
    run_train(launcher(), tmp_path / "ep1", demo_shards, *args, "cluster.expert_parallel=1")
    ours, reference = steps(tmp_path / "ep1"), steps(tmp_path / "ref")
    assert_same_steps(ours, reference)
    for s in reference:
        assert reference[s]["moe_loss"] > 0 and ours[s]["moe_loss"] == pytest.approx(reference[s]["moe_loss"], rel=1e-5)


def resumed_from_step_2(source, tmp_path, demo_shards, *overrides):
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step00000002", run_dir / "checkpoints" / "step00000002")
    (run_dir / "checkpoints" / "latest").write_text("step00000002")
    out = run_train(launcher(), run_dir, demo_shards, *MOE_ARGS, "logging.mode=disabled", *overrides)
    return run_dir, out.stdout


def test_resume_at_the_same_ep_size_is_exact(ep2_run, tmp_path, demo_shards):
    run_dir, stdout = resumed_from_step_2(ep2_run, tmp_path, demo_shards, "cluster.expert_parallel=2",
                                          "trainer.eval_every=2")
    assert "at step 2" in stdout and "universal" not in stdout
    again, first = steps(run_dir), steps(ep2_run)
    assert {s: [again[s][k] for k in ["loss", "grad_norm", *MOE_KEYS]] for s in again} == \
        {s: [first[s][k] for k in ["loss", "grad_norm", *MOE_KEYS]] for s in (3, 4)}


def test_resume_at_another_ep_size_goes_through_the_universal_checkpoint(ep2_run, tmp_path, demo_shards):
    """EP 2 -> EP 1 on the same 2 ranks: the experts are recut from DeepSpeed's universal form; the expert
    bias (a buffer, which DeepSpeed's universal load leaves alone) comes back from the model states."""
    run_dir, stdout = resumed_from_step_2(ep2_run, tmp_path, demo_shards, "cluster.expert_parallel=1")
    assert "was written at cluster.expert_parallel=2, this run has 1" in stdout and "at step 2" in stdout
    again, first = steps(run_dir), steps(ep2_run)
    assert_same_steps({3: again[3]}, {3: first[3]})  # the weights, moments and biases at step 2 came back whole
    # step 4 follows an update from the loaded Adam moments: close, not bitwise (the summation order changed)
    assert again[4]["loss"] == pytest.approx(first[4]["loss"], rel=1e-3)
    assert [again[4][f"moe_bias/{layer}"] for layer in LAYERS] == [first[4][f"moe_bias/{layer}"] for layer in LAYERS]


@pytest.fixture(scope="module")
def reference_export(moe_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe-export") / "hf"
    export(moe_run, folder, dtype="fp32")
    return folder


def test_export_of_an_ep_run_equals_the_reference_export(ep2_run, reference_export, tmp_path):
    """The checkpoint holds AutoEP's names and each rank's experts; the export reads it through the universal
    form under our names, so it is the reference run's export (both trained 4 steps from the same start)."""
    ours = export(ep2_run, tmp_path / "ep2", dtype="fp32")
    assert ours["step"] == 4
    a, b = load_file(tmp_path / "ep2" / "model.safetensors"), load_file(reference_export / "model.safetensors")
    assert set(a) == set(b) and any(".mlp.experts.7." in k for k in a) and any("expert_bias" in k for k in a)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-4), name


def test_init_from_an_export_at_ep2_carries_the_weights_and_the_biases(reference_export, tmp_path, demo_shards):
    """The way from the pure-torch experts to AutoEP (or back): a new run from the export. At lr 1e-30 the
    weights after a step are the source's; each expert bias moved by one update (+-0.001 or 0) from the
    source's, which had moved for 4 steps: a bias restarted at zero would be up to 0.004 away."""
    run_dir = tmp_path / "run"
    run_train(launcher(), run_dir, demo_shards, *MOE_ARGS, "logging.mode=disabled", "cluster.expert_parallel=2",
              f"model.init_from={reference_export}", "optim.lr=1e-30", "trainer.max_steps=1", "trainer.ckpt_every=0")
    export(run_dir, tmp_path / "again", dtype="fp32")
    a, b = load_file(tmp_path / "again" / "model.safetensors"), load_file(reference_export / "model.safetensors")
    assert set(a) == set(b)
    biases = [k for k in a if k.endswith("expert_bias")]
    assert len(biases) == len(LAYERS) and all(b[k].abs().max() > 0.002 for k in biases)
    for name in a:
        if name in biases:
            moved = (a[name] - b[name]).abs()
            assert torch.allclose(moved, torch.where(moved > 5e-4, 1e-3, 0.0), atol=1e-6), name
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("overrides, world, message", [
    (["model=tiny", "cluster.expert_parallel=2"], 2, "cluster.expert_parallel=2: expert parallelism needs a mixture"),
    (["model=tiny_moe", "cluster.expert_parallel=3"], 3,
     "cluster.expert_parallel=3 does not divide model.moe.num_experts=8"),
    (["model=tiny_moe", "cluster.expert_parallel=4"], 2, "cluster.expert_parallel=4 does not divide the world size 2"),
    (["model=tiny_moe", "cluster.expert_parallel=0"], 2, "cluster.expert_parallel=0 must be at least 1 (or null)"),
    (["model=tiny_moe", "+deepspeed.expert_parallel.autoep_size=2"], 2,
     "deepspeed.expert_parallel is set from cluster.expert_parallel"),
    (["model=tiny_moe", "cluster.expert_parallel=2", "deepspeed.zero_optimization.stage=2"], 2,
     "AutoEP is wired for ZeRO-3 here"),
])
def test_refused_in_one_line(overrides, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config([*overrides, "trainer.global_batch_size=24", "trainer.micro_batch_size=4"], world_size=world)


def test_a_switch_between_the_pure_torch_experts_and_autoep_is_refused():
    run = compose_config(["model=tiny_moe", "cluster.expert_parallel=2"], world_size=2)
    with pytest.raises(ConfigError, match="cluster.expert_parallel: None -> 2: .* model.init_from"):
        expert_parallel.reshard({"cluster": {"expert_parallel": None}}, run)
    assert expert_parallel.reshard({"cluster": {"expert_parallel": 2}}, run) is None
    assert "this run has 2" in expert_parallel.reshard({"cluster": {"expert_parallel": 1}}, run)
