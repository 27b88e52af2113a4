"""python -m launch.submit: the batch script it renders for the GPU cluster config, and the cluster
settings it refuses before anything is submitted (no SLURM needed: nothing reaches sbatch)."""

import os
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


def test_a_cluster_without_a_slurm_section_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["cluster=local_cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cluster=local_cpu has no slurm section; submit with cluster=slurm")


def test_time_limit_formats():
    assert [time_limit_seconds(t) for t in ("30", "30:15", "01:00:00", "2-00", "1-02:03", "1-00:00:05")] == [
        1800, 1815, 3600, 2 * 86400, 86400 + 2 * 3600 + 3 * 60, 86405]


# Issue 26, class 1: a config value must never become a line of the batch script. Every field written
# into it, each with a newline, a control character and a character outside its allow-list.
SCRIPT_FIELDS = {
    "cluster.slurm.partition": ["gpu\ntouch {marker}", "gpu\r", "gpu;touch {marker}", "gpu#x", "gpu x"],
    "cluster.slurm.account": ["proj\ntouch {marker}", "proj\x1b[2J", "proj'x", "$(touch {marker})"],
    "cluster.slurm.constraint": ["h100\ntouch {marker}", "h100\t", "h100 x", "h100#x", "h100;x"],
    "cluster.slurm.job_name": ["llada\ntouch {marker}", "llada\x07", "llada x", "llada$x"],
    "cluster.slurm.time_limit": ["30\ntouch {marker}", "30\x0b", "30 ", "30;x"],
    "cluster.slurm.log_dir": ["/logs\ntouch {marker}", "/logs\x1b", "/logs;x", "/logs/$(x)", "/lo gs"],
    "cluster.slurm.python": ["python\ntouch {marker}", "python\x7f", "python -c x", "python;x"],
    "cluster.slurm.env.WANDB_PROJECT": ["llada\ntouch {marker}", "llada\x1b[2J", "llada\r"],
    "cluster.slurm.sbatch_extra": [["--qos=high\ntouch {marker}"], ["--qos=high\x1b"], ["--qos high"], ["qos"]],
    "cluster.slurm.setup": [["module load cuda\ntouch {marker}"], ["module load cuda\r"]],
}
BASE = ["cluster=slurm", "cluster.slurm.partition=gpu", "model=llada_1b"]
BAD_VALUES = [(key, value) for key, values in SCRIPT_FIELDS.items() for value in values]


def refused_line(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("key, value", BAD_VALUES, ids=[f"{k}-{v!r}" for k, v in BAD_VALUES])
def test_every_value_written_into_the_script_is_refused_outside_its_characters(tmp_path, monkeypatch, capsys, key,
                                                                             value):
    # The value reaches the field through an environment variable (a config file or interpolation), so
    # the field's own check is what refuses it, not the command line's.
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    value = [v.format(marker=marker) for v in value] if isinstance(value, list) else value.format(marker=marker)
    for i, item in enumerate(value if isinstance(value, list) else [value]):
        monkeypatch.setenv(f"BAD{i}", item)
    reference = ("[" + ",".join(f"'${{oc.env:BAD{i}}}'" for i in range(len(value))) + "]"
                 if isinstance(value, list) else "${oc.env:BAD0}")
    plus = "+" if key.endswith("WANDB_PROJECT") else ""
    line = refused_line(capsys, ["--dry-run", *BASE, f"run_dir={tmp_path}/run", f"{plus}{key}={reference}"])
    shown = repr(value[0]) if isinstance(value, list) else repr(value)
    assert line.startswith(f"error: {key}") and shown in line, line
    assert not marker.exists() and list(tmp_path.iterdir()) == []  # nothing written, nothing run


@pytest.mark.parametrize("key, value", [("cluster.slurm.partition", "gpu\ntouch x"), ("run_dir", "/r\n/x"),
                                        ("logging.name", "a\rb"), ("+cluster.slurm.env.X", "a\x1bb"),
                                        ("cluster.slurm.setup", "['a\nb']")])
def test_a_control_character_on_the_command_line_is_refused_naming_its_key(tmp_path, monkeypatch, capsys, key, value):
    monkeypatch.chdir(tmp_path)
    line = refused_line(capsys, ["--dry-run", *BASE, f"{key}={value}"])
    assert line == f"error: {key}={value!r}: has a newline or control character; refusing to write it into the " \
                   f"batch script"
    assert list(tmp_path.iterdir()) == []


def test_values_inside_their_sets_are_written_quoted_as_one_word(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    env_value = "a b $(touch x) `id` 'q' \"d\" ; # end"
    monkeypatch.setenv("ENVVAL", env_value)
    main(["--dry-run", *BASE, "cluster.slurm.partition='gpu,gpu2'", "cluster.slurm.constraint='h100&ib|a100'",
          "cluster.slurm.sbatch_extra=['--comment=two words']", "+cluster.slurm.env.NOTE=${oc.env:ENVVAL}",
          f"run_dir={tmp_path}/run"])
    script = capsys.readouterr().out
    options = [shlex.split(o) for o in sbatch_options(script)]
    assert ["--partition=gpu,gpu2"] in options and ["--constraint=h100&ib|a100"] in options
    assert ["--comment=two words"] in options  # one argument for sbatch's own parser too
    (export,) = [line for line in script.splitlines() if line.startswith("export NOTE=")]
    echoed = subprocess.run(["bash", "-c", f'{export}; printf %s "$NOTE"'], cwd=tmp_path, capture_output=True,
                            text=True, check=True).stdout
    assert echoed == env_value and list(tmp_path.iterdir()) == []  # the $(touch x) was not run


# Issue 26, class 4 (the submitter's part): a path must resolve the same on every rank of the job.
PER_RANK_PATHS = ["run_dir=out_${oc.env:RANK}", "run_dir=/fs/r/${oc.env:SLURM_NODEID}",
                  "run_dir=/fs/r/${oc.env:LOCAL_RANK,0}", "data.dir=/fs/d/${oc.env:HOSTNAME}",
                  "data.dir=/fs/d/${oc.env:SLURMD_NODENAME}", "model.init_from=/fs/m/${oc.env:LOCAL_RANK}",
                  "run_dir=/fs/r/${now:%Y-%m-%d}", "cluster.slurm.log_dir=/fs/logs/${oc.env:SLURM_PROCID}"]


@pytest.mark.parametrize("override", PER_RANK_PATHS)
def test_a_path_that_differs_between_ranks_is_refused_in_one_line(tmp_path, monkeypatch, capsys, override):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "5")  # a login node inside an allocation: its own value proves nothing
    key = override.split("=", 1)[0]
    line = refused_line(capsys, ["--dry-run", *BASE, f"run_dir={tmp_path}/run", override])
    assert line.startswith(f"error: {key}={override.split('=', 1)[1]!r} differs between the job's ranks ("), line
    assert "a run is one directory that every rank shares" in line
    assert list(tmp_path.iterdir()) == []
    assert os.environ["RANK"] == "5" and "SLURM_NODEID" not in os.environ  # the imagined ranks leave nothing behind


def test_a_path_through_another_key_is_resolved_as_on_the_nodes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = refused_line(capsys, ["--dry-run", *BASE, "+paths.base=/fs/${oc.env:RANK}", "run_dir=${paths.base}/r"])
    assert line.startswith("error: run_dir='${paths.base}/r' differs between the job's ranks ('/fs/0/r' on rank 0")
    # The same on every rank (the user's own variable, the job's directory): submitted as typed.
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    main(["--dry-run", *BASE, "run_dir=${oc.env:SCRATCH}/r"])
    assert f"--output={tmp_path}/scratch/r/slurm/%x-%j.out" in capsys.readouterr().out
    from omegaconf import OmegaConf
    assert OmegaConf.create({"t": "${now:%Y}"}).t.isdigit()  # Hydra's clock is back after the check
