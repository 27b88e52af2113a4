"""python -m launch.submit: the batch script it renders for the GPU cluster config, and the cluster
settings it refuses before anything is submitted (no SLURM needed: nothing reaches sbatch)."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from launch.submit import compose_run, main, render, time_limit_seconds

GPU_JOB = ["cluster=slurm", "cluster.slurm.partition=gpu", "cluster.slurm.account=proj42", "cluster.nodes=4",
           "cluster.slurm.constraint=h100", "cluster.slurm.time_limit=2-00:00:00",
           "cluster.slurm.sbatch_extra=['--qos=high','--exclusive']", "+cluster.slurm.env.WANDB_PROJECT=llada",
           "model=llada_1b", "trainer.global_batch_size=1280", "logging.mode=online", "logging.name='1b run'",
           "optim.schedule.points=[[0,0],[2000,1]]", "run_dir=/fs/runs/llada1b"]


def sbatch_options(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_dry_run_of_the_gpu_config_is_the_script_a_user_submits(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["--dry-run", *GPU_JOB])
    script = capsys.readouterr().out
    assert sbatch_options(script) == [
        "--job-name=llada", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=64", "--gpus-per-node=8",
        "--partition=gpu", "--account=proj42", "--time=2-00:00:00", "--constraint=h100", "--signal=B:USR1@300",
        "--requeue", "--open-mode=append", "--output=/fs/runs/llada1b/slurm/%x-%j.out", f"--chdir={tmp_path}",
        "--qos=high", "--exclusive"]
    assert not Path("/fs/runs").exists() and not list(tmp_path.iterdir())  # a dry run writes nothing
    # The overrides reach the ranks unchanged: the TRAIN_ARGS array, parsed as bash would, is GPU_JOB.
    (args_line,) = [line for line in script.splitlines() if line.startswith("TRAIN_ARGS=(")]
    assert shlex.split(args_line.removeprefix("TRAIN_ARGS=(").removesuffix(")")) == GPU_JOB
    assignments = [line.removeprefix("export ") for line in script.splitlines()]
    settings = dict(a.split("=", 1) for a in assignments if re.fullmatch(r"[A-Z_]+=\S*", a))
    assert settings["LAUNCHER"] == "deepspeed" and settings["GPUS_PER_NODE"] == "8" and settings["REQUEUE"] == "1"
    assert settings["NCCL_DEBUG"] == "WARN" and settings["WANDB_PROJECT"] == "llada"
    assert "--num_nodes" in script and "--no_ssh --node_rank" in script and "srun --kill-on-bad-exit=1" in script
    assert "scontrol requeue" in script and 'trap "" USR1' in script
    assert "#@" not in script  # every placeholder filled
    check = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_torchrun_variant_and_cpu_layout_request_no_gpus(tmp_path):
    run = compose_run(["cluster=slurm_local", "cluster.slurm.launcher=torchrun", "trainer.global_batch_size=16"])
    script = render(run, [], tmp_path)
    assert "LAUNCHER=torchrun" in script and not any("gpus" in o for o in sbatch_options(script))
    assert "--nodes=2" in sbatch_options(script) and "--partition=debug" in sbatch_options(script)


@pytest.mark.parametrize("overrides, message", [
    (["cluster.nodes=3"],  # 3 nodes x 8 GPUs x 4 = 96 does not divide 1280
     "trainer.global_batch_size=1280 is not divisible by trainer.micro_batch_size=4 x world size 24"),
    (["cluster.slurm.partition=null"], "cluster.slurm.partition is not set"),
    (["cluster.slurm.partiton=gpu"], "partiton"),
    (["+cluster.slurm.gpu_type=h100"], "gpu_type"),
    (["cluster.slurm.time_limit=2days"], "cluster.slurm.time_limit='2days' is not a SLURM time"),
    (["cluster.slurm.preempt_signal_s=7200", "cluster.slurm.time_limit=01:00:00"], "cluster.slurm.preempt_signal_s"),
    (["cluster.slurm.launcher=mpirun"], "cluster.slurm.launcher='mpirun' is not one of deepspeed, torchrun"),
    (["cluster.gpus_per_node=0"], "cluster.gpus_per_node=0 must be at least 1"),
    (["cluster.slurm.sbatch_extra=[qos]"], "cluster.slurm.sbatch_extra: 'qos' is not one sbatch long option"),
    (["cluster.slurm.sbatch_extra=[--qos=high]"], "cluster.slurm.sbatch_extra=[--qos=high]"),  # unquoted: a parse error
])
def test_invalid_cluster_settings_fail_before_submission_with_one_line(tmp_path, monkeypatch, capsys, overrides,
                                                                       message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch: submitting at all would fail differently
    base = ["cluster=slurm", "cluster.slurm.partition=gpu", "model=llada_1b", f"run_dir={tmp_path}/run"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, *overrides])
    # an unknown key (a misspelt partition) is printed and exits 2, as on every entry point
    text = capsys.readouterr().err.strip() if exit_info.value.code == 2 else str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert not (tmp_path / "run").exists()


def test_a_cluster_without_a_slurm_section_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="^error: cluster=local_cpu has no slurm section; submit with cluster=slurm"):
        main(["cluster=local_cpu"])


def test_time_limit_formats():
    assert [time_limit_seconds(t) for t in ("30", "30:15", "01:00:00", "2-00", "1-02:03", "1-00:00:05")] == [
        1800, 1815, 3600, 2 * 86400, 86400 + 2 * 3600 + 3 * 60, 86405]
