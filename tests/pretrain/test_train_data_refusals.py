"""Issue 26 through the training entry point, under the default data=demo: a hostile or broken data
directory ends in one line naming the file, exit 2, before any process reads a shard, and leaves no
empty run_dir."""

import json
import os
import shutil
import sys

import pytest

from data_pipeline.shards import Manifest
from tests.conftest import run_train


def truncate_manifest(data):
    text = (data / "manifest.json").read_text()
    (data / "manifest.json").write_text(text[: len(text) // 3])
    return f"{data / 'manifest.json'}: not a valid manifest (not JSON at line"


def shard_on_dev_zero(data):
    path = data / Manifest.load(data).splits["train"][0].name
    path.unlink()
    path.symlink_to("/dev/zero")
    return f"{path}: resolves to /dev/zero, outside {os.path.realpath(data)}; refusing to read it"


def swapped_shard(data):
    infos = Manifest.load(data).splits["train"]
    i, j = next((i, j) for i in range(len(infos)) for j in range(i + 1, len(infos)) if infos[i].bytes == infos[j].bytes)
    shutil.copyfile(data / infos[i].name, data / infos[j].name)
    return f"{data / infos[j].name}: {infos[j].bytes} bytes, sha256 "


def entry_out_of_the_directory(data):
    raw = json.loads((data / "manifest.json").read_text())
    raw["splits"]["train"][0]["name"] = "../../../../dev/zero"
    (data / "manifest.json").write_text(json.dumps(raw))
    return f"{data / 'manifest.json'}: shard 0 of split 'train' is not a valid entry (name '../../../../dev/zero'"


@pytest.mark.parametrize("damage", [truncate_manifest, shard_on_dev_zero, swapped_shard, entry_out_of_the_directory],
                         ids=lambda f: f.__name__)
def test_a_hostile_data_directory_is_one_line_under_the_default_data(demo_shards, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(demo_shards, data)
    named = damage(data)
    run_dir = tmp_path / "run"
    proc = run_train([sys.executable, "-m", "pretrain.train"], run_dir, data, "trainer.max_steps=2",
                     "logging.mode=disabled", check=False, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith(f"error: {named}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not run_dir.exists()
