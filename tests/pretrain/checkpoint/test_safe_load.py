"""DeepSpeed's engine files loaded weights-only, in this process and in the universal conversion's
child; the conversion's child ends with the rank that started it. Real checkpoints of the real
entry point (the session's trained run), files planted beside them."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pretrain.checkpoint import safe_load
from pretrain.checkpoint.files import CheckpointError, read_manifest
from pretrain.checkpoint.store import Resume
from tests.conftest import REPO, child_env

MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


class Payload:
    """Unpickling it runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def checkpoint_copy(trained_run, tmp_path) -> Path:
    copy = tmp_path / "run" / "checkpoints" / "step00000015"
    shutil.copytree(trained_run / "checkpoints" / "step00000015", copy)
    return copy


def test_deepspeeds_files_need_nothing_beyond_the_allow_list(checkpoint_copy):
    files = sorted(checkpoint_copy.glob("*.pt"))
    assert files and all(safe_load.refusal(f) is None for f in files)
    with safe_load.weights_only_loads():  # DeepSpeed's own call, as it makes it
        state = torch.load(checkpoint_copy / MODEL_STATES, map_location="cpu", weights_only=False)
    assert "param_shapes" in state


def test_weights_only_even_where_deepspeed_asks_for_a_full_unpickle(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": Payload(marker)}, tmp_path / "planted.pt")
    with safe_load.weights_only_loads(), pytest.raises(Exception) as e:
        torch.load(tmp_path / "planted.pt", weights_only=False)
    assert safe_load.is_weights_only_refusal(e.value) and not marker.exists()
    assert os.environ.get(safe_load.FORCE) is None  # restored after the block
    assert "would unpickle io.open" in safe_load.refusal(tmp_path / "planted.pt")
    (tmp_path / "plain.pt").write_bytes(b"\x80\x04K\x01.")  # a bare pickle, not torch's zip format
    assert "not a torch zip file" in safe_load.refusal(tmp_path / "plain.pt")


def test_the_universal_conversion_refuses_a_planted_pickle_and_does_not_run_it(checkpoint_copy, tmp_path):
    from pretrain.checkpoint.universal import _source_id, convert_once

    marker = tmp_path / "pwned"
    torch.save({"module": Payload(marker)}, checkpoint_copy / MODEL_STATES)
    resume = Resume(checkpoint_copy.name, checkpoint_copy, read_manifest(checkpoint_copy))
    root = checkpoint_copy.parent / "universal"
    with pytest.raises(CheckpointError, match="conversion to DeepSpeed's universal checkpoint failed"):
        convert_once(resume.directory, root, resume.tag, _source_id(resume))
    assert not marker.exists() and not (root / checkpoint_copy.name).exists()


def written(partial: Path) -> list[str]:
    return sorted(str(p.relative_to(partial)) for p in partial.rglob("*.pt")) if partial.exists() else []


DRIVER = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from pretrain.checkpoint.files import read_manifest
from pretrain.checkpoint.store import Resume
from pretrain.checkpoint.universal import _source_id, convert_once
d = Path({ckpt!r})
r = Resume(d.name, d, read_manifest(d))
convert_once(d, d.parent / "universal", r.tag, _source_id(r))
"""


def test_the_conversion_ends_with_the_rank_that_started_it(checkpoint_copy):
    # kill -9 of the rank during the conversion: its child went on writing into the .partial directory
    # that the rerun deletes and rewrites. The child is held (SIGSTOP) once it has begun to write, the
    # rank dies, the child is released: it must not write another file.
    rank = subprocess.Popen([sys.executable, "-c", DRIVER.format(repo=str(REPO), ckpt=str(checkpoint_copy))],
                            cwd=REPO, env=child_env())
    partial = checkpoint_copy.parent / "universal" / f"{checkpoint_copy.name}.partial"
    deadline = time.monotonic() + 120
    child = None
    while time.monotonic() < deadline and rank.poll() is None and not written(partial):
        try:
            child = child or next(iter(psutil.Process(rank.pid).children()), None)
        except psutil.Error:
            pass
    assert child is not None and written(partial), "the conversion never began to write"
    family = [child, *child.children(recursive=True)]
    for p in family:
        p.suspend()
    before = written(partial)
    os.kill(rank.pid, signal.SIGKILL)
    rank.wait()
    for p in family:
        p.resume()
    _, alive = psutil.wait_procs(family, timeout=60)
    for p in alive:
        p.kill()
    assert not alive and written(partial) == before, \
        f"the conversion went on without its rank: {len(written(partial)) - len(before)} more files"
