"""The needle-in-a-haystack task writer (pretrain/hf/needle.py), sized with the tiny trained run's tokenizer.
lm-eval runs it end to end in tests/pretrain/test_lm_eval.py."""

import json
import re

import pytest

from pretrain.hf.needle import NEEDLE, QUESTION, main, write_task
from pretrain.hf.pretrained import open_source


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)
def test_each_item_fits_its_length_and_hides_one_needle_at_its_depth(trained_run, tmp_path):
    items = write_task(str(trained_run), tmp_path / "a", lengths=[64, 256], depths=[0.0, 0.5, 1.0], per_cell=2)
    assert [(i["length"], i["depth"]) for i in items] == [(n, d) for n in (64, 256) for d in (0.0, 0.5, 1.0)
                                                          for _ in range(2)]
    tok = open_source(trained_run).tokenizer()
    for item in items:
        prompt = item["prompt"]
        numbers = re.findall(r"\d+", prompt)
        assert len(numbers) == 1 and item["choices"][item["answer"]] == f" {numbers[0]}"  # the needle, once
        assert len(item["choices"]) == len({*item["choices"]}) == 4
        tokens = len(tok.encode(prompt).ids) + max(len(tok.encode(c).ids) for c in item["choices"])
        assert tokens == item["tokens"] and 0.75 * item["length"] < tokens <= item["length"]  # filled, never over
        needle = NEEDLE.format(numbers[0])
        assert prompt.endswith(QUESTION)
        where = prompt.index(needle.strip()) / (len(prompt) - len(QUESTION))
        assert {0.0: where == 0, 0.5: 0.3 < where < 0.7, 1.0: prompt.endswith(needle + QUESTION)}[item["depth"]]
    assert sorted(i["answer"] for i in items) != [0] * len(items)  # the right answer is not always first
    written = [json.loads(line) for line in (tmp_path / "a" / "needle.jsonl").read_text().splitlines()]
    assert written == items and "task: needle" in (tmp_path / "a" / "needle.yaml").read_text()
    again = write_task(str(trained_run), tmp_path / "b", lengths=[64, 256], depths=[0.0, 0.5, 1.0], per_cell=2)
    assert again == items  # seeded
    assert write_task(str(trained_run), tmp_path / "c", [64, 256], [0.0, 0.5, 1.0], 2, seed=1) != items


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)
def test_a_length_beyond_the_model_is_refused_in_one_line(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(trained_run), str(tmp_path / "o"), "--lengths", "2048"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: --lengths 2048: {trained_run} has max_sequence_length=1024\n"
    assert not (tmp_path / "o").exists()
