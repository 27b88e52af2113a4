"""docs/data.md's lines that read our shards with plain webdataset, run exactly as written."""

import re

import numpy as np

from data_pipeline.shards import Manifest, read_blocks
from tests.conftest import REPO, SEQ_LEN


def readme_webdataset_block() -> str:
    text = (REPO / "docs" / "data.md").read_text()
    section = text[text.index("**Reading the shards with plain `webdataset`.**"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_data_guide_reads_our_shards_with_webdataset(demo_shards, tmp_path, monkeypatch, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "corpus").symlink_to(demo_shards)
    monkeypatch.chdir(tmp_path)  # the guide's path, shards/corpus, is relative
    code = readme_webdataset_block()
    namespace: dict = {}
    exec(compile(code, "docs/data.md", "exec"), namespace)  # noqa: S102 (our own guide)
    manifest = Manifest.load(demo_shards)
    assert namespace["n"] == manifest.samples("train") and capsys.readouterr().out == f"{namespace['n']} windows\n"
    last = list(read_blocks(str(demo_shards / manifest.splits["train"][-1].name), np.dtype("<u2"), SEQ_LEN))[-1]
    assert np.array_equal(namespace["windows"], last.tokens) and np.array_equal(namespace["starts"], last.starts)
