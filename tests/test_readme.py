"""The README's commands, run as a new user would type them."""

import json
import re
import shlex
import subprocess
import sys

from data_pipeline.sources import demo_documents
from tests.conftest import REPO, child_env


def data_section_commands() -> list[list[str]]:
    """The numbered commands of the README's Data section, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Data\n\n```bash\n(.*?)```", text, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.startswith("python -m ")]


def test_the_data_section_runs_as_written(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(demo_documents()[:60]):  # many small files, one document each
        (corpus / f"doc{i:03d}.txt").write_text(doc)
    commands = data_section_commands()
    assert [c[2] for c in commands] == ["data_pipeline.tokenizer", "data_pipeline.build", "data_pipeline.validate",
                                        "pretrain.train"]
    for cmd in commands:
        if cmd[2] == "pretrain.train":  # the README's 300 steps take minutes; the point is that it runs
            cmd = [a if not a.startswith("trainer.max_steps=") else "trainer.max_steps=3" for a in cmd]
            cmd += ["trainer.log_every=1"]
        proc = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, env=child_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    metrics = (tmp_path / "outputs" / "corpus" / "metrics.jsonl").read_text().splitlines()
    assert len([m for m in metrics if '"loss"' in m]) == 3
    assert "warning: optim.schedule" not in proc.stderr  # the example's lr schedule fits its run


def after_training_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## After training: export, evaluate, sample\n.*?```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("python -m ")]


def test_the_after_training_section_runs_as_written(tmp_path, trained_run):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "demo").symlink_to(trained_run)  # stands for make demo's run
    commands = after_training_commands()
    assert [c[2] for c in commands] == ["pretrain.export", "pretrain.evaluate", "pretrain.generate"]
    outputs = []
    for cmd in commands:
        proc = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, env=child_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    # The export's default is bf16, whatever the run trained in (fp32 on request: tests/pretrain/test_export.py).
    assert json.loads((tmp_path / "outputs" / "demo-hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert '"nelbo"' in outputs[1] and '"completion"' in outputs[2]


def test_the_venv_is_activated_before_the_first_bare_python():
    """The README's commands are bare `python -m ...`: it says how to get the venv's python first."""
    text = (REPO / "README.md").read_text()
    first_bare = text.index("\npython -m ")
    assert text.index("source .venv/bin/activate") < first_bare and text.index(".venv/bin/python") < first_bare


def test_the_data_section_is_sized_for_a_cpu_and_says_how_long_it_takes():
    text = (REPO / "README.md").read_text()
    settings = dict(a.split("=", 1) for cmd in data_section_commands() for a in cmd if "=" in a)
    assert int(settings["data.vocab_size"]) <= 4096 and int(settings["trainer.seq_len"]) <= 256
    train = data_section_commands()[-1]
    assert not any(a.startswith("data.inputs=") for a in train)  # data.dir alone: the manifest says the rest
    assert re.search(r"300 steps in about \d+ minutes on 2 cores", text)
