"""Every command-line entry point: `--help` prints what it takes and exits 0 without side effects, and an
unknown flag is an error, never a file name or an override."""

import subprocess
import sys

import pytest

from tests.conftest import child_env

ENTRY_POINTS = ["pretrain.train", "pretrain.model", "data_pipeline.build", "data_pipeline.tokenizer",
                "data_pipeline.validate", "pretrain.export", "pretrain.evaluate", "pretrain.generate",
                "pretrain.report", "pretrain.plan", "launch.submit", "launch.local_cluster", "launch.run"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_prints_usage_and_touches_nothing(module, tmp_path):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert module.split(".")[-1] in proc.stdout
    assert "usage" in proc.stdout.lower() or "powered by Hydra" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_unknown_flag_is_an_error(module, tmp_path):
    proc = subprocess.run([sys.executable, "-m", module, "--no-such-flag"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr and "usage:" in proc.stderr
    assert list(tmp_path.iterdir()) == []
