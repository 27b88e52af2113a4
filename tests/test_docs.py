"""The guides' commands, run as a new user would type them (docs/*.md and the README).

Every fenced ```bash block carries, on the line just before its fence, exactly one marker:
`<!-- doc-test: run -->` (run here as written), `<!-- doc-test: dry-run -->` (a SLURM submission,
run here with the `--dry-run` it contains) or `<!-- doc-test: skip REASON -->` (not run here). The run
and dry-run blocks of one guide run in order, each with `bash -euo pipefail`, in a fresh copy of the
repository's tracked files (so `conf/...` and `outputs/...` paths work as at a user's repo root), with
the venv's bin first on PATH, PYTHONPATH = that copy, WANDB_MODE=offline and OMP_NUM_THREADS=1; later
blocks see what earlier ones wrote. Every docs/*.md is picked up; none is listed here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO

MARKER = re.compile(r"<!-- doc-test: (\S+)(?: (.*?))? -->")
KINDS = ("run", "dry-run", "skip")


class MarkerError(ValueError):
    pass


@dataclass
class Block:
    path: str
    line: int  # of the fence, 1-based
    kind: str
    reason: str
    code: str


def bash_blocks(text: str, path: str = "<text>") -> list[Block]:
    """Every ```bash block of a markdown text with its marker; a missing, unknown or reason-less (skip)
    marker raises MarkerError naming the file and line."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            if marker is None:
                raise MarkerError(f"{path}:{i + 1}: a ```bash block without a doc-test marker on the line before it "
                                  f"(one of: {', '.join(KINDS)})")
            kind, reason = marker.group(1), (marker.group(2) or "").strip()
            if kind not in KINDS:
                raise MarkerError(f"{path}:{i}: unknown doc-test marker {kind!r} (one of: {', '.join(KINDS)})")
            if kind == "skip" and not reason:
                raise MarkerError(f"{path}:{i}: `skip` needs a reason (e.g. needs a GPU)")
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise MarkerError(f"{path}:{i + 1}: a ```bash block that is never closed")
            blocks.append(Block(path, i + 1, kind, reason, "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return blocks


DOCS = sorted((REPO / "docs").glob("*.md"))
MARKED = [REPO / "README.md", *DOCS]


def name(path: Path) -> str:
    return str(path.relative_to(REPO))


def guide_blocks(path: Path) -> list[Block]:
    return bash_blocks(path.read_text(), name(path))


# -- the convention ---------------------------------------------------------------------------------
def test_a_missing_unknown_or_unexplained_marker_is_refused():
    fence = "```bash\necho hi\n```\n"
    assert [b.kind for b in bash_blocks(f"<!-- doc-test: run -->\n{fence}")] == ["run"]
    assert bash_blocks(f"<!-- doc-test: skip needs a GPU -->\n{fence}")[0].reason == "needs a GPU"
    for text, match in ((f"text\n{fence}", "without a doc-test marker"), (fence, "without a doc-test marker"),
                        (f"<!-- doc-test: runn -->\n{fence}", "unknown doc-test marker 'runn'"),
                        (f"<!-- doc-test: skip -->\n{fence}", "needs a reason"),
                        (f"<!-- doc-test: run -->\n\n{fence}", "without a doc-test marker")):
        with pytest.raises(MarkerError, match=match):
            bash_blocks(text, "guide.md")


@pytest.mark.parametrize("path", MARKED, ids=name)
def test_every_bash_block_carries_one_known_marker(path):
    blocks = guide_blocks(path)  # raises on a block without a marker
    for b in blocks:
        if b.kind == "dry-run":
            assert "--dry-run" in b.code, f"{b.path}:{b.line}: a dry-run block must contain --dry-run"
    assert path.name == "README.md" or blocks, f"{name(path)} has no bash block"


# -- running the guides -----------------------------------------------------------------------------
UNTRACKED = (".git", ".venv", ".cache", "outputs", ".pytest_cache", "__pycache__")


def tracked_copy(dest: Path) -> Path:
    """The repository's tracked files (as they are in the working tree) copied to dest; outside a git
    checkout (a source tarball), every file but the venv, caches and outputs."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode == 0:
        files = filter(None, listed.stdout.decode().split("\0"))
    else:
        files = (str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if not set(p.relative_to(REPO).parts) & set(UNTRACKED))
    for rel in files:
        src = REPO / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def docs_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(root), WANDB_MODE="offline",
               OMP_NUM_THREADS="1")
    return env


@dataclass
class Ran:
    block: Block
    returncode: int
    stdout: str
    stderr: str
    seconds: float


_RUNS: dict[str, tuple[Path, list[Ran]]] = {}


def run_guide(path: Path, tmp_root: Path) -> tuple[Path, list[Ran]]:
    """A guide's run and dry-run blocks, in order, in a fresh copy; stops at the first that fails."""
    key = name(path)
    if key not in _RUNS:
        root = tracked_copy(tmp_root / path.stem)
        ran = []
        for b in guide_blocks(path):
            if b.kind == "skip":
                continue
            started = time.monotonic()
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", b.code], cwd=root, env=docs_env(root),
                                  capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
            ran.append(Ran(b, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started))
            print(f"{b.path}:{b.line}: exit {proc.returncode} in {ran[-1].seconds:.1f} s")  # pytest -s shows it
            if proc.returncode:
                break
        _RUNS[key] = root, ran
    return _RUNS[key]


@pytest.fixture(scope="session")
def guides_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("guides")


RUNNABLE = [p for p in MARKED if any(b.kind != "skip" for b in guide_blocks(p))]


@pytest.mark.parametrize("path", RUNNABLE, ids=name)
def test_the_guide_runs_as_written(path, guides_root):
    _, ran = run_guide(path, guides_root)
    for r in ran:
        assert r.returncode == 0, (f"{r.block.path}:{r.block.line} exited {r.returncode}\n{r.block.code}\n"
                                   f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    assert len(ran) == sum(b.kind != "skip" for b in guide_blocks(path))


def outputs_of(path: str, guides_root: Path) -> tuple[Path, list[Ran]]:
    root, ran = run_guide(REPO / path, guides_root)
    if any(r.returncode for r in ran):
        pytest.fail(f"{path} did not run: see test_the_guide_runs_as_written")
    return root, ran


# -- what the guides promise, checked on what they wrote (was tests/test_readme.py) ----------------
def commands(block: Block) -> list[list[str]]:
    lines = block.code.replace("\\\n", " ").splitlines()
    return [shlex.split(line.split(" #")[0]) for line in lines if line.startswith("python -m ")]


def test_the_data_guide_is_sized_for_a_cpu_and_trains_on_its_shards(guides_root):
    root, ran = outputs_of("docs/data.md", guides_root)
    cmds = [c for r in ran for c in commands(r.block)]
    assert [c[2] for c in cmds] == ["data_pipeline.tokenizer", "data_pipeline.build", "data_pipeline.validate",
                                    "pretrain.train"]
    settings = dict(a.split("=", 1) for c in cmds for a in c if "=" in a)
    assert int(settings["data.vocab_size"]) <= 4096 and int(settings["trainer.seq_len"]) <= 256
    assert not any(a.startswith("data.inputs=") for a in cmds[-1])  # data.dir: the manifest says the rest
    assert re.search(r"300 steps in about \d+ minutes on 2 cores", (REPO / "docs" / "data.md").read_text())
    manifest = json.loads((root / "shards" / "corpus" / "manifest.json").read_text())
    assert manifest["documents"]["documents"] == len(list((root / "corpus").iterdir()))  # the .gz one included
    metrics = [json.loads(x) for x in (root / "outputs" / "corpus" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 5, 10, 15, 20]  # the first step, then every 5th
    assert "warning: optim.schedule" not in ran[-1].stderr  # the example's lr schedule fits its run


def test_the_using_a_model_guide_exports_evaluates_samples_and_agrees_with_lm_eval(guides_root):
    root, ran = outputs_of("docs/using_a_model.md", guides_root)
    # The export's default is bf16, whatever the run trained in (fp32 on request).
    assert json.loads((root / "outputs" / "quick-hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    after = ran[1].stdout.splitlines()
    assert json.loads(after[-2])["nelbo"] > 0 and "completion" in json.loads(after[-1])
    assert "max |ours - transformers|" in ran[2].stdout
    # lm-eval and evaluate --choices on the same file: the same scores (the first prompt ends in a space)
    ours = json.loads(ran[-1].stdout.splitlines()[-1])
    samples = [json.loads(x) for p in (root / "results").rglob("samples_my_task_*.jsonl")
               for x in p.read_text().splitlines()]
    theirs = {s["doc_id"]: [-float(r[0][0]) for r in s["resps"]] for s in samples}
    assert sorted(theirs) == list(range(len(ours["nll"])))
    for doc, nll in enumerate(ours["nll"]):
        assert theirs[doc] == pytest.approx(nll, rel=1e-5)


def test_the_checkpoints_guide_says_what_it_verified_and_that_a_finished_run_is_finished(guides_root):
    _, ran = outputs_of("docs/checkpoints.md", guides_root)
    out = ran[0].stdout
    assert re.search(r"verified the SHA-256 of \d+ files in 2 complete checkpoints", out)
    assert "at step 6\nrun_dir=outputs/ck already finished at step 6 (trainer.max_steps=6): nothing to train" in out


def test_the_venv_is_activated_before_the_first_bare_python():
    """The guides' commands are bare `python -m ...`: the README says how to get the venv's python first."""
    text = (REPO / "README.md").read_text()
    first_bare = text.index("\npython -m ")
    assert text.index("source .venv/bin/activate") < first_bare and text.index(".venv/bin/python") < first_bare


def test_the_readme_stays_short_and_maps_every_guide():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text
    for path in DOCS:
        assert f"({name(path)})" in text, f"README.md does not link {name(path)}"
