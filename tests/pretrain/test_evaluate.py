import itertools
import json
import math

import numpy as np
import pytest
import torch

from data_pipeline.shards import Manifest
from pretrain.evaluate import evaluate_nelbo, main, windows
from pretrain.export import export
from pretrain.hf.pretrained import load_model, open_source
from pretrain.objective.likelihood import NelboSums, draw_seed, elbo_terms, nelbo_of_batch


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


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)  # precision plays no part here
def test_one_sequence_gives_json_with_a_null_se_and_a_warning(trained_run, capsys):
    main([str(trained_run), "--max-sequences", "1", "--mc-num", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert result["sequences"] == 1 and result["se"] is None and math.isfinite(result["nelbo"])
    assert "gave 1 sequence(s) of 64 tokens: too few for a standard error (none)" in err


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
    # each choice's Monte Carlo standard error: the spread of its draws / sqrt(mc_num), the draws of item 0's
    # choice 0 redone here
    assert [len(s) for s in out["nll_se"]] == [2, 3, 2]
    source = open_source(trained_run)
    tok = source.tokenizer()
    prompt, choice = tok.encode("The module").ids, tok.encode(" defines").ids
    x0 = torch.tensor([prompt + choice])
    maskable = torch.arange(x0.shape[1])[None] >= len(prompt)
    terms = elbo_terms(load_model(source), x0, maskable, source.mask_id, 4,
                       torch.Generator().manual_seed(draw_seed(0, 0, 0)), 16)[0]
    assert out["nll"][0][0] == pytest.approx(terms.mean().item()) and terms.std() > 0
    assert out["nll_se"][0][0] == pytest.approx(terms.std().item() / 2)
    one = run(capsys, trained_run, "--choices", tmp_path / "mc.jsonl", "--mc-num", 1, "--device", "cpu")
    assert all(e is None for s in one["nll_se"] for e in s)  # one draw: no spread to measure


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)  # precision plays no part here
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


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)  # precision plays no part here
def test_a_model_trained_with_a_document_mask_is_scored_within_documents(trained_run, demo_shards):
    # As if the run had trained with model.document_mask=true: the held-out windows are scored with
    # attention kept inside each document. Reference: the same estimator with the documents found
    # independently, from the EOS that ends each packed document.
    source = open_source(trained_run)
    model = load_model(source)
    args = (demo_shards, "heldout", 64, 2, 16, 0, "cpu")  # all 64 windows, 2 draws each: 8 passes of 16
    plain = evaluate_nelbo(model, source, *args)
    source.model.document_mask = True
    within = evaluate_nelbo(model, source, *args)
    manifest = Manifest.load(demo_shards)
    rows = [row for row, _, _ in itertools.islice(windows(demo_shards, manifest, "heldout"), 64)]
    x0 = torch.tensor(np.stack(rows), dtype=torch.long)
    doc_start = torch.zeros_like(x0, dtype=torch.bool)
    doc_start[:, 1:] = x0[:, :-1] == manifest.eos_id
    assert doc_start[:, 1:].any()  # a held-out window holds the start of a document
    generator, reference = torch.Generator().manual_seed(0), NelboSums()
    for lo in range(0, 64, 8):
        reference.sums += nelbo_of_batch(model, x0[lo:lo + 8], source.mask_id, 2, generator, None, 16,
                                         doc_start[lo:lo + 8]).sums
    assert within["nelbo"] == pytest.approx(reference.estimate().nelbo, rel=1e-12)
    # One window of 64 holds a document start, so the estimate moves only a little (~1e-7), but it moves.
    assert within["nelbo"] != plain["nelbo"]
