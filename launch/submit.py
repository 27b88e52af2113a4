"""Submit a training run to SLURM from a login node.

    python -m launch.submit cluster=slurm cluster.slurm.partition=gpu model=llada_1b [overrides...]
    python -m launch.submit --dry-run cluster=slurm ...     # print the batch script, submit nothing

The Hydra overrides are composed and checked exactly as `python -m pretrain.train` will (with the
world size the layout gives: cluster.nodes x cluster.gpus_per_node), the cluster.slurm section is checked, and every
error is one line before anything is submitted. Then launch/slurm/pretrain.sbatch is filled (the
#SBATCH lines and a settings block), kept in the log directory, and passed to sbatch. The overrides
reach the training processes unchanged; the job runs in the directory this command ran in.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.config import OverrideError
from launch.node_paths import check_same_on_every_rank
from launch.script_values import (
    ACCOUNT,
    CONSTRAINT,
    JOB_NAME,
    PARTITION,
    PATH,
    check_chars,
    check_env,
    check_int,
    check_line,
    check_overrides,
    check_sbatch_extra,
)
from pretrain.checks import load_config
from pretrain.config import ConfigError, RunConfig, SlurmConfig

TEMPLATE = Path(__file__).resolve().parent / "slurm" / "pretrain.sbatch"
LAUNCHERS = ("deepspeed", "torchrun")
# sbatch's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", re.ASCII)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def time_limit_seconds(value: str) -> int:
    m = _TIME.fullmatch(value) if isinstance(value, str) else None  # no strip: "30\n..." is not a time
    _require(m is not None,
             f"cluster.slurm.time_limit={value!r} is not a SLURM time (MM, HH:MM:SS, D-HH, D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # M or M:S


def check_slurm(run: RunConfig) -> SlurmConfig:
    """The cluster.slurm section, or a one-line ConfigError naming the key at fault. Every value that
    is written into the batch script passes its field's allow-list (launch/script_values.py)."""
    s = run.cluster.slurm
    _require(s is not None, f"cluster={run.cluster.name} has no slurm section; submit with cluster=slurm "
                            f"(GPU nodes) or cluster=slurm_local (CPU)")
    for key in ("nodes", "gpus_per_node"):
        _require(check_int(f"cluster.{key}", getattr(run.cluster, key)) >= 1,
                 f"cluster.{key}={getattr(run.cluster, key)} must be at least 1")
    _require(check_int("cluster.slurm.cpus_per_node", s.cpus_per_node) >= 1,
             f"cluster.slurm.cpus_per_node={s.cpus_per_node} must be at least 1")
    _require(bool(s.partition and s.partition.strip()),
             "cluster.slurm.partition is not set: name your site's partition (`sinfo -s` lists them), "
             "e.g. cluster.slurm.partition=gpu")
    check_chars("cluster.slurm.partition", s.partition, PARTITION)
    if s.account:
        check_chars("cluster.slurm.account", s.account, ACCOUNT)
    if s.constraint:
        check_chars("cluster.slurm.constraint", s.constraint, CONSTRAINT)
    limit = time_limit_seconds(s.time_limit)
    _require(0 < limit, f"cluster.slurm.time_limit={s.time_limit!r} must be longer than 0")
    _require(0 <= check_int("cluster.slurm.preempt_signal_s", s.preempt_signal_s) < min(limit, 65536),
             f"cluster.slurm.preempt_signal_s={s.preempt_signal_s} must be in [0, time limit {limit}s) "
             f"and below 65536 (sbatch --signal)")
    _require(type(s.requeue) is bool, f"cluster.slurm.requeue={s.requeue!r} is not true or false")
    _require(s.launcher in LAUNCHERS, f"cluster.slurm.launcher={s.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    check_chars("cluster.slurm.job_name", s.job_name, JOB_NAME)
    check_chars("cluster.slurm.log_dir", s.log_dir, PATH)
    if s.python:
        check_chars("cluster.slurm.python", s.python, PATH)
    check_env(s.env)
    check_sbatch_extra(s.sbatch_extra)
    for line in s.setup:  # shell lines by design: they run as written, but each on one line
        check_line("cluster.slurm.setup", line)
    return s


def _culprit(overrides: list[str]) -> str:
    """Hydra's grammar errors do not say which override they are about; find it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException:
            return f"override {override!r} does not parse (quote values holding '=' or '--'): "
    return ""


def compose_run(overrides: list[str]) -> RunConfig:
    """The config every rank of the job will load, validated at the job's world size."""
    from data_pipeline.config import compose

    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:  # a bad override: a key that does not exist, ...
        raise ConfigError(f"config: {_culprit(overrides)}{str(e).splitlines()[0]}") from None
    nodes, gpus = cfg.cluster.get("nodes"), cfg.cluster.get("gpus_per_node")
    world = 1
    if isinstance(nodes, int) and isinstance(gpus, int):
        world = max(1, nodes) * max(1, gpus)  # a value < 1 is named by check_slurm
    check_same_on_every_rank(cfg, gpus if isinstance(gpus, int) else 1)  # before this node's environment resolves them
    run = load_config(cfg, world)
    check_slurm(run)
    return run


def sbatch_lines(run: RunConfig, workdir: Path) -> list[str]:
    s = run.cluster.slurm
    log_dir = workdir / s.log_dir
    opts = [f"--job-name={s.job_name}", f"--nodes={run.cluster.nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={s.cpus_per_node}"]
    if run.cluster.device == "cuda":
        opts.append(f"--gpus-per-node={run.cluster.gpus_per_node}")
    opts.append(f"--partition={s.partition}")
    if s.account:
        opts.append(f"--account={s.account}")
    opts.append(f"--time={s.time_limit}")
    if s.constraint:
        opts.append(f"--constraint={s.constraint}")
    opts += [f"--signal=B:USR1@{s.preempt_signal_s}", "--requeue" if s.requeue else "--no-requeue",
             "--open-mode=append", f"--output={log_dir}/%x-%j.out", f"--chdir={workdir}", *s.sbatch_extra]
    # sbatch reads its own #SBATCH lines with shell-like quotes: an allow-listed value needs none, so
    # shlex.quote changes nothing there; anything else stays one argument.
    return [f"#SBATCH {shlex.quote(o)}" for o in opts]


def settings_block(run: RunConfig, overrides: list[str], workdir: Path, python: str) -> list[str]:
    s = run.cluster.slurm
    q = shlex.quote
    lines = ["# Filled in by python -m launch.submit from the cluster= config",
             f"WORKDIR={q(str(workdir))}",
             f"LOG_DIR={q(str(workdir / s.log_dir))}",
             f"PYTHON={q(s.python or python)}",
             f"LAUNCHER={q(s.launcher)}",
             f"GPUS_PER_NODE={int(run.cluster.gpus_per_node)}",
             f"REQUEUE={int(s.requeue)}"]
    lines += [f"export {k}={q(str(v))}" for k, v in s.env.items()]
    lines += list(s.setup)
    lines.append("TRAIN_ARGS=(" + " ".join(q(o) for o in overrides) + ")")
    return lines


def render(run: RunConfig, overrides: list[str], workdir: Path, python: str = sys.executable) -> str:
    text = TEMPLATE.read_text()
    text = text.replace("#@SBATCH@\n", "".join(line + "\n" for line in sbatch_lines(run, workdir)))
    return text.replace("#@SETTINGS@\n", "".join(line + "\n" for line in settings_block(run, overrides, workdir,
                                                                                          python)))


def submit(script: str, log_dir: Path, env: dict | None = None) -> str:
    """Keeps the script in log_dir (what was submitted, when) and sbatches it; returns the job id."""
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create --output's directory
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = log_dir / f"submit-{stamp}.sbatch"
    path.write_text(script)
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m pretrain.train")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if o.startswith("-")]
    if bad:
        sys.exit(f"error: {bad[0]}: only Hydra overrides (key=value) are passed on; sweeps (-m) are not submitted")
    workdir = Path.cwd()
    try:
        check_chars("the working directory (sbatch --chdir)", str(workdir), PATH)
        check_overrides(args.overrides)
        run = compose_run(args.overrides)
    except (ConfigError, OverrideError) as e:  # one line, exit 2 as every entry point
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    script = render(run, args.overrides, workdir)
    if args.dry_run:
        print(script, end="")
        return
    log_dir = workdir / run.cluster.slurm.log_dir
    job = submit(script, log_dir)
    print(f"submitted job {job}: {run.cluster.nodes} nodes x {run.cluster.gpus_per_node} ranks; "
          f"log {log_dir}/{run.cluster.slurm.job_name}-{job}.out; run_dir {workdir / run.run_dir}")


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
