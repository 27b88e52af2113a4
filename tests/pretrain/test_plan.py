import json
import subprocess
import sys

import pytest

from pretrain.checks import compose_config
from pretrain.plan import main, make_plan, report, total_params
from tests.conftest import REPO, child_env

GIB = 2**30 / 1e9


def test_the_papers_8b_run_costs_its_published_gpu_hours():
    # LLaDA 8B: 2.3T tokens, 1280 x 4096 per step, on H800s; the paper reports 0.13M H800 GPU-hours.
    run = compose_config(["model=llada_8b", "cluster=gpu_node", "trainer.max_tokens=2300000000000"], world_size=8)
    plan = make_plan(run, mfu=0.25, device_name="NVIDIA H800")
    assert plan.tokens_per_step == 1280 * 4096
    assert plan.gpu_hours == pytest.approx(0.13e6, rel=0.15)


@pytest.mark.parametrize("checkpointing, measured_gib", [("none", 64.5), ("full", 48.5)])
def test_memory_estimate_matches_the_h200_measurement(checkpointing, measured_gib):
    # bench/gpu.py on one H200 (BENCHMARKS.md): llada_8b with 8 layers, ZeRO-3 on 1 GPU, micro batch 4.
    run = compose_config(["model=llada_8b", "model.n_layers=8", "cluster=gpu_single",
                          f"trainer.activation_checkpointing={checkpointing}"])
    plan = make_plan(run, mfu=0.4, device_name="NVIDIA H200")
    assert plan.total_gb == pytest.approx(measured_gib * GIB, rel=0.15)


def test_warns_when_a_gpu_would_overflow_and_says_what_checkpointing_saves():
    run = compose_config(["model=llada_8b", "cluster=gpu_node"], world_size=8)
    plan = make_plan(run, mfu=0.4, device_name="H100")
    assert plan.activations_full_gb < plan.activations_none_gb / 5
    text = report(plan, run)
    assert "WARNING" in text and "cluster.gpu_memory_gb=80" in text and "activation_checkpointing=full" in text
    fits = compose_config(["model=llada_8b", "cluster=gpu_node", "trainer.activation_checkpointing=full"], world_size=8)
    assert "WARNING" not in report(make_plan(fits, mfu=0.4, device_name="H100"), fits)


def test_model_states_shrink_with_the_number_of_gpus():
    one = make_plan(compose_config(["model=llada_1b", "cluster=gpu_single"]), 0.4, "H100")
    eight = make_plan(compose_config(["model=llada_1b", "cluster=gpu_node"], world_size=8), 0.4, "H100")
    assert one.model_states_gb == pytest.approx(16 * one.params / 1e9)
    assert eight.model_states_gb == pytest.approx(one.model_states_gb / 8)
    assert one.comm_gb_per_step == 0 and eight.comm_gb_per_step > 0


def test_cli_prints_the_plan_and_one_json_line():
    out = subprocess.run([sys.executable, "-m", "pretrain.plan", "model=llada_1b", "cluster=gpu_node", "--mfu", "0.5",
                          "--gpu", "H100"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120,
                         check=True)
    assert "GPU-hours" in out.stdout and "memory per GPU" in out.stdout
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["mfu"] == 0.5 and plan["gpus"] == 8 and plan["peak_tflops"] == 989.0
    assert "Setting accelerator to CPU" not in out.stdout + out.stderr  # DeepSpeed's CPU-fallback notice, muted


@pytest.mark.parametrize("argv, message", [
    (["--mfu", "0"], "error: --mfu 0 must be in (0, 1]"),  # was a ZeroDivisionError
    (["--mfu", "-1"], "error: --mfu -1 must be in (0, 1]"),  # was accepted: negative tokens per day
    (["--mfu", "nan"], "error: --mfu nan must be in (0, 1]"),
    (["--mfu", "lots"], "argument --mfu: invalid float value: 'lots'"),
    (["trainer.log_every=0"], "error: trainer.log_every=0 must be positive"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["model=llada_1b", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_a_model_whose_vocabulary_comes_from_the_data_is_planned(capsys):
    plan = main(["model=tiny", "data.vocab_size=1000"])  # was a TypeError: vocab_size null
    assert plan.params == total_params(compose_config(["model=tiny", "model.vocab_size=1024"]).model)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "Plan a run before any GPU hour is spent" in capsys.readouterr().out


LONG = ["model=llada_8b", "cluster=gpu_node", "trainer.seq_len=32768", "model.max_sequence_length=32768",
        "trainer.micro_batch_size=1", "trainer.global_batch_size=64", "trainer.activation_checkpointing=full"]


def test_sequence_parallelism_splits_the_activations_not_the_flops():
    # llada_8b at 32k on 8 GPUs: whole sequences per GPU, then each split over all 8 (Ulysses)
    whole = make_plan(compose_config(LONG, world_size=8), 0.4, "H100")
    split = make_plan(compose_config([*LONG, "cluster.sequence_parallel=8"], world_size=8), 0.4, "H100")
    assert split.sequence_parallel == 8 and whole.sequence_parallel == 1
    assert split.activations_none_gb == pytest.approx(whole.activations_none_gb / 8)
    assert split.activations_full_gb == pytest.approx(whole.activations_full_gb / 8)
    assert split.accumulation == 8 * whole.accumulation  # 1 data-parallel rank instead of 8
    assert split.model_states_gb == whole.model_states_gb and split.step_s == whole.step_s
    assert whole.all_to_all_gb_per_step == 0 < split.all_to_all_gb_per_step
    assert whole.activations_none_gb > 80 > split.total_gb  # 32k without checkpointing needs the split


def test_cli_plans_32k_with_sequence_parallelism_and_refuses_a_size_that_does_not_divide():
    cmd = [sys.executable, "-m", "pretrain.plan", *LONG]
    out = subprocess.run([*cmd, "cluster.sequence_parallel=8"], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=120, check=True)
    assert "sequence parallel 8: 4,096 tokens of each sequence per GPU" in out.stdout
    assert "(sequence-parallel all-to-all)" in out.stdout
    assert json.loads(out.stdout.strip().splitlines()[-1])["sequence_parallel"] == 8
    bad = subprocess.run([*cmd, "cluster.sequence_parallel=3"], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: cluster.sequence_parallel=3 does not divide the world size 8: each group of "
                                  "3 ranks splits its sequences, so the world must be whole groups")


MOE = ["model=llada2_mini", "cluster=gpu_node", "cluster.nodes=2"]  # 16 GPUs


def test_expert_parallelism_moves_the_gather_not_the_model_states():
    """llada2_mini on 16 GPUs: without EP each MoE block's forward gathers all 256 experts; at EP 8 a GPU gathers
    its 32, so the gathered memory and the ZeRO-3 traffic fall, the states do not, and tokens travel instead."""
    whole = make_plan(compose_config(MOE, world_size=16), 0.4, "H100")
    ep = make_plan(compose_config([*MOE, "cluster.expert_parallel=8"], world_size=16), 0.4, "H100")
    routed = 3 * 2048 * 512 * 256  # one MoE layer's experts
    assert ep.model_states_gb == whole.model_states_gb and ep.step_s == whole.step_s
    assert whole.gathered_gb - ep.gathered_gb == pytest.approx(2 * 2 * routed * 7 / 8 / 1e9)
    experts = 19 * routed  # layers 1-19 of 20 are MoE
    zero3 = lambda p, n: 3 * 2 * p * (n - 1) / n  # noqa: E731  all-gather twice + reduce-scatter, per micro-step
    assert ep.comm_gb_per_step == pytest.approx(whole.accumulation * (zero3(whole.params - experts, 16)
                                                                      + zero3(experts / 8, 2)) / 1e9)
    tokens = 4 * 4096  # one micro-batch per GPU: each token's 8 copies out and back, forward and backward, bf16
    assert whole.expert_all_to_all_gb_per_step == 0
    assert ep.expert_all_to_all_gb_per_step == pytest.approx(whole.accumulation * 19 * 4 * tokens * 8 * 2048 * 2
                                                             * 7 / 8 / 1e9)
    assert "expert parallel 8: " in report(ep, compose_config([*MOE, "cluster.expert_parallel=8"], world_size=16))
