"""Every command-line entry point: `--help` prints what it takes and exits 0 without side effects, and an
unknown flag is an error, never a file name or an override."""

import subprocess
import sys

import pytest

from tests.conftest import child_env

ENTRY_POINTS = ["pretrain.train", "pretrain.model", "data_pipeline.build", "data_pipeline.tokenizer",
                "data_pipeline.validate", "pretrain.export", "pretrain.evaluate", "pretrain.generate",
                "pretrain.lm_eval", "pretrain.report", "pretrain.plan", "launch.submit", "launch.local_cluster",
                "launch.run", "pretrain.hf.needle"]


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


# The entry points that take Hydra overrides, with the arguments each needs before them.
HYDRA_ENTRY_POINTS = [("pretrain.train", []), ("pretrain.model", []), ("pretrain.plan", []),
                      ("data_pipeline.build", []), ("data_pipeline.tokenizer", ["out.json"]),
                      ("launch.submit", ["cluster=slurm"])]


@pytest.mark.parametrize("module,args", HYDRA_ENTRY_POINTS, ids=[m for m, _ in HYDRA_ENTRY_POINTS])
def test_an_unknown_key_is_one_line_with_the_closest_known_keys(module, args, tmp_path):
    # Hydra's own message: six lines, exit 1, advising `+trainer.max_stepz=3` (which would add the typo).
    proc = subprocess.run([sys.executable, "-m", module, *args, "trainer.max_stepz=3"], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "+trainer" in line]
    assert proc.returncode == 2 and errors == [
        "error: trainer.max_stepz=3: unknown config key 'trainer.max_stepz'; closest known: trainer.max_steps, "
        "trainer.max_bad_steps, trainer.max_tokens"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


def test_an_unknown_group_option_names_the_options():
    from data_pipeline.config import OverrideError, compose

    with pytest.raises(OverrideError) as e:
        compose(["model=tinyy"])
    assert str(e.value) == "model=tinyy: conf/model/ has no such option; did you mean tiny or tiny_moe? options: " \
                           "llada2_mini, llada_1b, llada_8b, llama3_2_1b, qwen2_5_0_5b, small, tiny, tiny_moe"
    with pytest.raises(OverrideError, match=r"^data.inputz=\[a\]: unknown config key 'data.inputz'; closest known: "
                                            r"data.inputs"):
        compose(["data=files", "data.inputz=[a]"])
