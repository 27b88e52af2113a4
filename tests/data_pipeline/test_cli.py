"""--help and unknown flags on every data_pipeline entry point: usage and exit 0, or an error;
never work done, never a file named after the flag."""

import subprocess
import sys

import pytest

from tests.conftest import child_env

COMMANDS = {"build": ["data.*", "shard_bytes:", "build.*", "workers:"],
            "tokenizer": ["OUT.json", "data.vocab_size"],
            "validate": ["DIR", "manifest"]}


def run(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=child_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_prints_usage_and_does_nothing_else(tmp_path, command):
    for flag in ("--help", "-h"):
        proc = run(tmp_path, f"data_pipeline.{command}", flag)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: python -m data_pipeline.{command}")
        for word in COMMANDS[command]:
            assert word in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no tokenizer named --help, no outputs/


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unknown_flags_are_errors_not_file_names(tmp_path, command):
    args = {"build": ["--bogus", "data=demo"], "tokenizer": ["--bogus", "out.json"], "validate": ["--bogus", "."]}
    proc = run(tmp_path, f"data_pipeline.{command}", *args[command])
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_wants_its_output_file_first(tmp_path):
    proc = run(tmp_path, "data_pipeline.tokenizer", "data=files", "data.inputs=[x]")
    assert proc.returncode == 2 and "the first argument is the output file" in proc.stderr
    assert list(tmp_path.iterdir()) == []
