"""Damaged compressed inputs: a one-line error naming the file, from the reader and from the build."""

import gzip
import json
import subprocess
import sys

import pytest
import zstandard

from data_pipeline.shards import DataError
from data_pipeline.sources import DocumentReader
from tests.conftest import REPO, SEQ_LEN, child_env

LINES = "".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(3000)).encode()


def compressed(kind: str) -> bytes:
    return gzip.compress(LINES) if kind == "gz" else zstandard.ZstdCompressor().compress(LINES)


def read(path) -> list[str]:
    return list(DocumentReader(str(path), "text", "text", "", "", "replace"))


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_a_truncated_compressed_input_is_an_error_naming_it(tmp_path, kind):
    whole = compressed(kind)
    path = tmp_path / f"cut.jsonl.{kind}"
    for cut in (len(whole) // 2, len(whole) - 3):
        path.write_bytes(whole[:cut])
        with pytest.raises(DataError, match=f"^{path}: unreadable, truncated or corrupt") as e:
            read(path)
        assert "\n" not in str(e.value)


def test_zstd_files_of_several_frames_are_read_whole(tmp_path):
    path = tmp_path / "two.jsonl.zst"
    path.write_bytes(compressed("zst") * 2)
    assert len(read(path)) == 6000


def test_the_build_reports_a_truncated_input_in_one_line(tmp_path, demo_shards):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(compressed("gz"))
    (tmp_path / "in" / "b.jsonl.zst").write_bytes(compressed("zst")[:-100])
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.build", "data=files", f"data.inputs=[{tmp_path}/in]",
                           f"data.dir={tmp_path}/out", f"data.tokenizer={demo_shards}/tokenizer.json",
                           f"trainer.seq_len={SEQ_LEN}", "build.workers=2", "build.progress=false"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}/in/b.jsonl.zst: unreadable, truncated or corrupt "
                                                "(EOFError: zstd data ended inside a frame (the file is truncated))"]


def test_compressed_text_of_any_name_is_read_as_one_document_and_archives_are_not(tmp_path):
    """Debian's changelog.Debian.gz is gzip text whose name names no format: read it, as .txt."""
    from data_pipeline.sources import resolve_inputs

    corpus = tmp_path / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    (corpus / "pkg" / "changelog.Debian.gz").write_bytes(gzip.compress(b"pkg (1.0) unstable; urgency=low\n"))
    (corpus / "NOTES.zst").write_bytes(zstandard.ZstdCompressor().compress(b"release notes\n"))
    (corpus / "bundle.tar.gz").write_bytes(gzip.compress(b"not a document"))
    (corpus / "README.md").write_text("left out: not a format this reads")
    found = resolve_inputs([str(corpus)])
    assert [p.split("corpus/")[1] for p in found] == ["NOTES.zst", "pkg/changelog.Debian.gz"]
    assert read(found[1]) == ["pkg (1.0) unstable; urgency=low\n"] and read(found[0]) == ["release notes\n"]
    assert resolve_inputs([str(corpus / "pkg" / "changelog.Debian.gz")]) == [found[1]]
    with pytest.raises(DataError, match=r"bundle.tar.gz is not .txt/.jsonl/.parquet \(optionally .gz/.zst\) nor"):
        resolve_inputs([str(corpus / "bundle.tar.gz")])
