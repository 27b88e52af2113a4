import json
import math

import pytest

from pretrain.evaluate import main
from pretrain.export import export


def run(capsys, *argv) -> dict:
    main([str(a) for a in argv])
    return json.loads(capsys.readouterr().out)


def fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_nelbo_from_a_run_and_from_its_export(trained_run, demo_shards, tmp_path, capsys):
    common = ["--max-sequences", 12, "--mc-num", 4, "--batch-size", 16, "--device", "cpu"]
    a = run(capsys, trained_run, *common)
    assert a["sequences"] == 12 and a["tokens"] == 12 * 64 and a["split"] == "heldout"
    assert a["data"] == str(demo_shards) and a["source"].endswith("step00000030")
    assert 0 < a["mc_se"] and 0 < a["se"] < 1 and a["perplexity_bound"] == pytest.approx(math.exp(a["nelbo"]))
    assert a["nelbo"] < math.log(1024)  # trained: better than a uniform guess over the vocabulary
    assert run(capsys, trained_run, *common) == a  # deterministic
    export(trained_run, tmp_path / "hf", dtype="fp32")
    b = run(capsys, tmp_path / "hf", "--data", demo_shards, *common)
    assert {k: v for k, v in b.items() if k != "source"} == {k: v for k, v in a.items() if k != "source"}
    earlier = run(capsys, trained_run, "--step", 15, *common)
    assert earlier["source"].endswith("step00000015") and earlier["nelbo"] != a["nelbo"]


def test_multiple_choice_accuracy(trained_run, tmp_path, capsys):
    items = [{"prompt": "The module", "choices": [" defines", " zq xv"], "answer": 0},
             {"prompt": "Return the", "choices": [" value", " of", " qqq"], "answer": " value"},
             {"prompt": "If the", "choices": [" a", " b"], "answer": 1}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    out = run(capsys, trained_run, "--choices", tmp_path / "mc.jsonl", "--mc-num", 4, "--device", "cpu")
    assert out["items"] == 3 and [len(s) for s in out["nll"]] == [2, 3, 2]
    picks = [min(range(len(s)), key=s.__getitem__) for s in out["nll"]]
    assert out["correct"] == sum(p == a for p, a in zip(picks, [0, 0, 1], strict=True))
    assert out["accuracy"] == out["correct"] / 3 and all(v > 0 for s in out["nll"] for v in s)


def test_cli_errors(trained_run, demo_shards, tmp_path, capsys):
    export(trained_run, tmp_path / "hf", dtype="bf16")
    assert "give --data SHARD_DIR" in fails(capsys, tmp_path / "hf")
    assert "--mc-num=0 must be positive" in fails(capsys, trained_run, "--mc-num", 0)
    assert "no windows in split 'test'" in fails(capsys, trained_run, "--split", "test")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "choices": ["b", "c"], "answer": 0}\n{"prompt": "a", "choices": ["b"]}\n')
    assert f"{bad}:2: expected" in fails(capsys, trained_run, "--choices", bad)
    bad.write_text('{"prompt": "a", "choices": ["b", "c"], "answer": 2}\n')
    assert f"{bad}:1: answer=2 is neither" in fails(capsys, trained_run, "--choices", bad)
    assert "no checkpoint at --step 3" in fails(capsys, trained_run, "--step", 3)
