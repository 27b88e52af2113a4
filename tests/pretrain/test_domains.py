"""Every numeric config key has a checked domain (pretrain/domains.py), refused in one line before any work."""

import copy
import math
import re
import subprocess
import sys

import pytest

from data_pipeline.config import compose
from pretrain.checks import compose_config
from pretrain.config import ConfigError, parse_config
from pretrain.domains import DOMAINS, check_domains, numeric_keys, values_at
from tests.conftest import REPO, child_env


def test_every_numeric_key_of_the_typed_configs_has_a_domain():
    covered = {re.sub(r"\[\*\].*$", "[*]", k) for k in DOMAINS} | set(DOMAINS)
    missing = [k for k in numeric_keys() if k not in covered and k.removesuffix("[*]") not in covered]
    assert not missing, f"add these keys to pretrain/domains.py's DOMAINS table: {missing}"


@pytest.fixture(scope="module")
def full_run():
    """A run with every optional section present (a SLURM layout, fault lists), unchecked."""
    return parse_config(compose(["cluster=slurm", "cluster.slurm.partition=gpu", "fault.nan_steps=[3]",
                                 "fault.nan_ranks=[0]", "fault.sleep_at_step=2", "mask.prompt_len=8",
                                 "mask.band=[0.3,0.8]", "model=tiny_moe"]))


def _set(obj, name: str, value) -> None:
    parts = re.findall(r"\[\d+\]|[^.\[\]]+", name)
    for part in parts[:-1]:
        obj = obj[int(part[1:-1])] if part.startswith("[") else getattr(obj, part)
    last = parts[-1]
    if last.startswith("["):
        obj[int(last[1:-1])] = value
    else:
        setattr(obj, last, value)


@pytest.mark.parametrize("key", sorted(DOMAINS))
def test_a_value_outside_each_keys_domain_is_refused_in_one_line(full_run, key):
    check_domains(full_run)  # the defaults are inside every domain
    domain = DOMAINS[key]
    names = [name for name, _ in values_at(full_run, key)]
    assert names, f"{key} names nothing in the composed config"
    bad = next(v for v in (-1, 0, float("nan"), float("inf"), 1.5, None) if domain.problem(key, v))
    run = copy.deepcopy(full_run)
    _set(run, names[0], bad)
    with pytest.raises(ConfigError) as err:
        check_domains(run)
    text = str(err.value)
    assert text.startswith(f"{names[0]}=") and "\n" not in text


@pytest.mark.parametrize("override, message", [
    ("model.n_heads=0", "model.n_heads=0 must be positive"),  # was a ZeroDivisionError traceback
    ("model.n_kv_heads=0", "model.n_kv_heads=0 must be positive"),
    ("trainer.global_batch_size=0", "trainer.global_batch_size=0 must be positive"),
    ("optim.schedule.points=[[0,nan],[5,1]]", "optim.schedule.points[0][1]=nan must be a finite number >= 0"),
    ("optim.schedule.points=[[0,0.1],[5,-0.6]]", "optim.schedule.points[1][1]=-0.6 must be"),  # trained at lr < 0
    ("optim.schedule.points=[[nan,0.1],[5,1]]", "optim.schedule.points[0][0]=nan must be"),
    ("model.rope_theta=0", "model.rope_theta=0.0 must be a positive number"),  # trained to NaN, exit 0
    ("model.rms_norm_eps=-1", "model.rms_norm_eps=-1.0 must be a positive number"),
    ("model.init_std=inf", "model.init_std=inf must be a positive number"),
    ("mask.random_length_prob=nan", "mask.random_length_prob=nan must be in [0, 1]"),
    ("data.heldout_fraction=1", "data.heldout_fraction=1.0 must be in [0, 1)"),
    ("trainer.eval_mc_num=0", "trainer.eval_mc_num=0 must be positive"),
    ("sample.temperature=-1", "sample.temperature=-1.0 must be >= 0"),
    ("seed=-3", "seed=-3 must be an integer >= 0"),
])
def test_issue_values_are_refused_by_the_composed_config(override, message):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_train_refuses_a_zero_head_count_before_creating_run_dir(tmp_path):
    run_dir = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "model.n_heads=0", f"run_dir={run_dir}"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == ["error: model.n_heads=0 must be positive"]
    assert not run_dir.exists()


def test_nan_is_never_inside_a_domain():
    assert all(d.problem("k", math.nan) for d in DOMAINS.values())
