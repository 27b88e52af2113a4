"""The mixture of experts in training (model=tiny_moe): ZeRO-3 on 2 ranks with the pure-torch MoE, the expert
bias update and the load metrics in metrics.jsonl, W&B and the report, an exact resume, and what is refused."""

import shutil

from pretrain.monitor.report import write_report
from tests.conftest import BIN, MOE_ARGS, free_port, read_metrics, run_train

LAYERS = (1, 2, 3)  # tiny_moe: layer 0 dense


def test_moe_trains_under_zero3_and_logs_the_expert_load(moe_run):
    rows = [r for r in read_metrics(moe_run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert "moe_load/0" not in r
        for layer in LAYERS:
            assert 1.0 <= r[f"moe_load/{layer}"] <= 8.0  # max / mean over 8 experts
            assert 0.0 <= r[f"moe_idle/{layer}"] < 1.0
    # the bias moves by 0.001 per step per expert: after s steps its range is at most 2 x 0.001 x s, and not 0
    for r in rows:
        for layer in LAYERS:
            assert 0 < r[f"moe_bias/{layer}"] <= 2 * 0.001 * r["step"] + 1e-6
    assert "moe_loss" not in rows[0]  # tiny_moe has no auxiliary loss: nothing to log
    history = next(moe_run.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    assert b"moe_load/3" in history and b"moe_bias/1" in history


def test_report_draws_the_expert_load(moe_run, tmp_path):
    written = {p.name for p in write_report([moe_run], tmp_path)}
    assert {"moe_load.png", "moe_idle.png", "moe_bias.png"} <= written and "moe_loss.png" not in written


def test_resume_is_exact_with_the_expert_bias(moe_run, tmp_path, demo_shards):
    """A run resumed from step 2 repeats the uninterrupted run's steps 3 and 4 exactly: the losses and the
    expert bias (saved with the model: a bias restarted at zero would show another range)."""
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(moe_run / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002")
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                "pretrain.train"]
    out = run_train(launcher, resumed, demo_shards, *MOE_ARGS, "logging.mode=disabled")
    assert "at step 2" in out.stdout
    keys = ["loss", "grad_norm"] + [f"moe_{k}/{layer}" for k in ("load", "bias") for layer in LAYERS]
    first = {r["step"]: [r[k] for k in keys] for r in read_metrics(moe_run) if "loss" in r}
    again = {r["step"]: [r[k] for k in keys] for r in read_metrics(resumed) if "loss" in r}
    assert set(again) == {3, 4} and again == {s: first[s] for s in (3, 4)}


def test_moe_resume_refuses_another_expert_count():
    from pretrain.checkpoint.resume_check import compare

    saved = {"model": {"moe": {"num_experts": 8, "bias_update_rate": 0.001}}}
    refused, allowed = compare(saved, {"model": {"moe": {"num_experts": 16, "bias_update_rate": 0.002}}}, None, "x")
    assert refused == ["model.moe.num_experts: 8 -> 16"] and allowed == ["model.moe.bias_update_rate: 0.001 -> 0.002"]


