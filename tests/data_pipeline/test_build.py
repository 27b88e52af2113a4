import hashlib
import tarfile

import numpy as np
import pytest

from data_pipeline.build import build, ensure_built, pack, pad_vocab
from data_pipeline.shards import DataError, Manifest, decode_sample
from data_pipeline.sources import demo_documents
from data_pipeline.tokenizer import EOS, MASK, load_tokenizer
from tests.conftest import SEQ_LEN, demo_data_config


def test_pack_appends_eos_and_cuts_windows():
    windows = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_id=0, seq_len=4)
    assert windows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]  # the last partial window is dropped
    assert pack([[1, 2]], 0, 4).shape == (0, 4)


def test_vocab_is_padded_to_a_multiple_of_128():
    assert [pad_vocab(n) for n in (1, 128, 129, 4096, 50257)] == [128, 128, 256, 4096, 50304]


def test_demo_corpus_is_the_pydoc_topics_text():
    docs = demo_documents()
    assert len(docs) > 50 and 400_000 < sum(map(len, docs)) < 600_000


def test_shards_match_the_manifest(demo_shards):
    manifest = Manifest.load(demo_shards)
    tok = load_tokenizer(demo_shards / "tokenizer.json")
    assert manifest.seq_len == SEQ_LEN and manifest.vocab_size == 1024 and manifest.dtype == "<u2"
    assert (manifest.eos_id, manifest.mask_id) == (tok.token_to_id(EOS), tok.token_to_id(MASK))
    assert len(manifest.splits["train"]) > 1 and manifest.samples("heldout") > 0
    key_seen = set()
    for shards in manifest.splits.values():
        for info in shards:
            path = demo_shards / info.name
            assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
            with tarfile.open(path) as tar:
                members = tar.getmembers()
                assert len(members) == info.samples and info.tokens == info.samples * SEQ_LEN
                for m in members:
                    key, ext = m.name.split(".")
                    key_seen.add(key)
                    sample = {"__key__": key, ext: tar.extractfile(m).read()}
                    ids = decode_sample(sample, np.dtype(manifest.dtype), SEQ_LEN)
                    assert ids.max() < manifest.vocab_size
    assert len(key_seen) == manifest.samples("train") + manifest.samples("heldout")


def test_tokens_round_trip_to_the_corpus_text(demo_shards):
    manifest = Manifest.load(demo_shards)
    tok = load_tokenizer(demo_shards / "tokenizer.json")
    with tarfile.open(demo_shards / manifest.splits["train"][0].name) as tar:
        first = np.frombuffer(tar.extractfile(tar.getmembers()[0]).read(), dtype="<u2")
    text = tok.decode(first.tolist(), skip_special_tokens=False)
    assert text.replace(EOS, "") in "".join(demo_documents()).replace("\n", "\n")


def test_build_is_byte_identical_when_repeated(tmp_path, demo_shards):
    build(demo_data_config(tmp_path / "again"))
    first, second = Manifest.load(demo_shards), Manifest.load(tmp_path / "again")
    assert first.fingerprint() == second.fingerprint()
    assert [s.sha256 for s in first.splits["train"]] == [s.sha256 for s in second.splits["train"]]


def test_malformed_sample_is_named():
    sample = {"__key__": "000000000007", "__url__": "train-000003.tar", "tokens": b"\x00" * 10}
    with pytest.raises(ValueError, match="train-000003.tar: sample 000000000007 holds 10 bytes"):
        decode_sample(sample, np.dtype("<u2"), SEQ_LEN)
    with pytest.raises(ValueError, match="has no '.tokens' member"):
        decode_sample({"__key__": "1", "pickle": b"\x80\x04K\x01."}, np.dtype("<u2"), SEQ_LEN)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=f"no manifest.json in {tmp_path}"):
        Manifest.load(tmp_path)


def test_shards_built_with_other_settings_are_refused(demo_shards):
    with pytest.raises(DataError, match=f"{demo_shards} was built with data.vocab_size=1024, this run has "
                                        "data.vocab_size=2048"):
        ensure_built(demo_data_config(demo_shards, vocab_size=2048))
    assert ensure_built(demo_data_config(demo_shards, shuffle_buffer=7)).seq_len == SEQ_LEN
