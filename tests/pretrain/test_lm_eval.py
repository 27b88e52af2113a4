"""python -m pretrain.lm_eval: lm-eval-harness with the model `llada`, end to end on local tasks (a YAML
and a .jsonl each, no network) of each request type, on the tiny trained run; the same numbers as
pretrain.evaluate and pretrain.generate, and the same from two processes under torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.evaluate import evaluate_choices
from pretrain.generate import main as generate_main
from pretrain.hf.needle import write_task
from pretrain.hf.pretrained import load_model, open_source
from pretrain.lm_eval import lm_eval_argv, main
from pretrain.model.kv_cache import KVCache
from pretrain.objective.sampler import cut_completion, generate
from tests.conftest import BIN, REPO, child_env, free_port

MC_NUM = 8
# Items 0, 1 and 3 have a planted answer (the demo corpus's words against letter salad): it must rank
# first by a wide margin; item 2 is a toss-up.
ITEMS = [{"prompt": "Return a new list containing all items from the", "choices": [" iterable", " zqxv", " kjw"],
          "answer": 0},
         {"prompt": "The module", "choices": [" defines", " zq xv"], "answer": 0},
         {"prompt": "If the", "choices": [" a", " b"], "answer": 1},
         {"prompt": "Return the absolute value of a", "choices": [" number", " qqq", " vvv"], "answer": 0},
         # lm-eval moves a prompt's trailing space into the choice: evaluate --choices must pair them the same way
         {"prompt": "Return the absolute value of a ", "choices": ["number", "qqq"], "answer": 0}]
PLANTED = (0, 1, 3)
GEN_PROMPTS = ["Return", "The module defines", "Return a new list containing all"]  # token lengths differ
GEN = {"gen_length": 8, "steps": 4, "threshold": 0.2, "cache": "dual"}  # fast sampling, batched with padding
TEXTS = ["Return the absolute value of a number.", "The module defines the functions of the interpreter."]


def yaml_task(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n{body}")


def write_tasks(folder: Path, stop: str) -> None:
    folder.mkdir(parents=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "target": " the"}) + "\n" for p in GEN_PROMPTS))
    (folder / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (folder / "mc.yaml").write_text(yaml_task("llada_mc", folder / "mc.jsonl", """output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""))
    (folder / "gen.yaml").write_text(yaml_task("llada_gen", folder / "gen.jsonl", f"""output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: [{json.dumps(stop)}]
  max_gen_toks: 64
  gen_length: {GEN["gen_length"]}
  steps: {GEN["steps"]}
  threshold: {GEN["threshold"]}
  cache: {GEN["cache"]}
metric_list:
  - metric: exact_match
"""))
    (folder / "ppl.yaml").write_text(yaml_task("llada_ppl", folder / "ppl.jsonl", """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
"""))


def hf_env(root: Path) -> dict:
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf-home"),
            "HF_DATASETS_CACHE": str(root / "hf-datasets")}


def read_output(folder: Path) -> tuple[dict, dict]:
    """(results, {task: {doc_id: sample}}) from lm-eval's --output_path folder."""
    results = json.loads(next(folder.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for path in folder.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}
    return results, samples


TASKS = ["--tasks", "llada_mc,llada_gen,llada_ppl,needle", "--model_args", f"mc_num={MC_NUM}", "--log_samples"]


@pytest.fixture(scope="module")
def harness(trained_run, tmp_path_factory):
    """One lm-eval run in this process over the three tasks; the `until` string is cut from the middle of
    a completion the sampler gives for the longest prompt, so it does stop that one."""
    root = tmp_path_factory.mktemp("lm-eval")
    source = open_source(trained_run)
    tok = source.tokenizer()
    prompt = torch.tensor([tok.encode(GEN_PROMPTS[-1]).ids])
    row = generate(load_model(source), prompt, GEN["gen_length"], GEN["steps"], source.mask_id,
                   threshold=GEN["threshold"], cache=KVCache(GEN["cache"]))[0, prompt.shape[1]:]
    full = cut_completion(row.tolist(), tok.decode, source.eos_id)[1]
    stop = full[len(full) // 2: len(full) // 2 + 1] or "e"
    write_tasks(root / "tasks", stop)
    write_task(str(trained_run), root / "tasks", lengths=[64], depths=[0.0, 1.0], per_cell=2)  # pretrain/hf/needle.py
    saved = sys.argv, {k: os.environ.get(k) for k in hf_env(root)}
    os.environ.update(hf_env(root))
    try:
        main([str(trained_run), *TASKS, "--include_path", str(root / "tasks"), "--output_path", str(root / "out")])
    finally:
        sys.argv = saved[0]
        for k, v in saved[1].items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return root, stop, full, *read_output(root / "out")


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)  # precision plays no part here
def test_local_tasks_run_end_to_end_and_the_planted_answers_rank_first(harness):
    _, _, _, results, samples = harness
    assert set(samples) == {"llada_mc", "llada_gen", "llada_ppl", "needle"}
    for doc in PLANTED:
        ll = [float(r[0][0]) for r in samples["llada_mc"][doc]["resps"]]
        assert max(range(len(ll)), key=ll.__getitem__) == ITEMS[doc]["answer"]
        assert samples["llada_mc"][doc]["acc"] == 1.0
    accs = [samples["llada_mc"][d]["acc"] for d in range(len(ITEMS))]
    assert results["llada_mc"]["acc,none"] == pytest.approx(sum(accs) / len(ITEMS))
    assert 1 < results["llada_ppl"]["word_perplexity,none"] < float("inf")
    assert 0 <= results["llada_gen"]["exact_match,none"] <= 1


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)
def test_loglikelihood_equals_pretrain_evaluate_on_the_same_pairs_and_seed(harness, trained_run):
    _, _, _, _, samples = harness
    source = open_source(trained_run)
    ours = evaluate_choices(load_model(source), source, ITEMS, MC_NUM, 16, 0, "cpu")
    for doc in range(len(ITEMS)):
        ll = [float(r[0][0]) for r in samples["llada_mc"][doc]["resps"]]
        assert ll == pytest.approx([-x for x in ours["nll"][doc]], rel=1e-5)


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)
def test_the_needle_task_runs_end_to_end_with_our_estimator(harness, trained_run):
    # No pass bar on a 64-token model trained 30 steps; what must hold: lm-eval scored every item of the
    # written task, with the choices' likelihoods that pretrain.evaluate gives on the same items and seed.
    root, _, _, results, samples = harness
    items = [json.loads(line) for line in (root / "tasks" / "needle.jsonl").read_text().splitlines()]
    assert len(items) == 4 and sorted(samples["needle"]) == list(range(4))
    source = open_source(trained_run)
    ours = evaluate_choices(load_model(source), source, items, MC_NUM, 16, 0, "cpu")
    for doc, item in enumerate(items):
        ll = [float(r[0][0]) for r in samples["needle"][doc]["resps"]]
        assert ll == pytest.approx([-x for x in ours["nll"][doc]], rel=1e-5)
        assert samples["needle"][doc]["acc"] == float(max(range(4), key=ll.__getitem__) == item["answer"])
    accs = [samples["needle"][d]["acc"] for d in range(4)]
    assert results["needle"]["acc,none"] == pytest.approx(sum(accs) / 4)


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)
def test_generation_stops_at_until_as_pretrain_generate_does(harness, trained_run, tmp_path, capsys):
    # lm-eval sampled the prompts (of different lengths) in one left-padded batch; here one at a time
    _, stop, full, _, samples = harness
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in GEN_PROMPTS))
    generate_main([str(trained_run), "--prompts-file", str(prompts), "--gen-length", str(GEN["gen_length"]),
                   "--steps", str(GEN["steps"]), "--threshold", str(GEN["threshold"]), "--cache", GEN["cache"],
                   "--batch-size", "1", "--stop", stop, "--device", "cpu"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for doc, line in enumerate(lines):
        assert samples["llada_gen"][doc]["resps"][0][0] == line["completion"]
        assert stop not in line["completion"]
    assert lines[-1]["finish"] == "stop" and len(lines[-1]["completion"]) < len(full)


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)
def test_two_processes_under_torchrun_share_the_documents_and_agree(harness, trained_run, tmp_path):
    root, _, _, results, samples = harness
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "pretrain.lm_eval",
           str(trained_run), *TASKS, "--include_path", str(root / "tasks"), "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env={**child_env(), **hf_env(tmp_path)}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for rank in (0, 1):  # both ranks scored documents of each type (anywhere in a line: the other rank's
        for kind in ("loglikelihood", "generate_until", "loglikelihood_rolling"):  # progress bar may precede)
            counts = re.findall(rf"llada rank {rank}/2: (\d+) {kind} requests", proc.stderr)
            assert counts and all(int(c) > 0 for c in counts), (rank, kind, proc.stderr[-3000:])
    results2, samples2 = read_output(tmp_path / "out")
    for task, docs in samples.items():
        assert sorted(samples2[task]) == sorted(docs)  # every document once, gathered from both ranks
        for doc, sample in docs.items():
            # (filtered: lm-eval pads a rank that has fewer documents with a repeat of its last request)
            assert samples2[task][doc]["filtered_resps"] == sample["filtered_resps"], (task, doc)
    assert results2["llada_mc"]["acc,none"] == results["llada_mc"]["acc,none"]


def test_command_line_errors():
    with pytest.raises(ValueError, match="give SOURCE"):
        lm_eval_argv(["--tasks", "x"])
    with pytest.raises(ValueError, match="leave --model out"):
        lm_eval_argv(["RUN", "--model", "hf", "--tasks", "x"])
    with pytest.raises(ValueError, match="give --tasks"):
        lm_eval_argv(["run"])
    argv = lm_eval_argv(["RUN", "--tasks", "x", "--batch_size", "4"])
    assert argv[:3] == ["run", "--model", "llada"] and "32" not in argv and argv[-1] == '{"source": "RUN"}'
    assert argv[argv.index("--device") + 1] == "auto"


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)
def test_lm_eval_and_evaluate_choices_draw_as_many_masks_by_default(trained_run, tmp_path, capsys):
    import inspect

    from pretrain.evaluate import main as evaluate_main
    from pretrain.hf.harness import LLaDAHarness
    from pretrain.hf.pretrained import CHOICE_MC_NUM

    assert inspect.signature(LLaDAHarness.__init__).parameters["mc_num"].default == CHOICE_MC_NUM == 128
    (tmp_path / "mc.jsonl").write_text(json.dumps(ITEMS[-1]) + "\n")
    evaluate_main([str(trained_run), "--choices", str(tmp_path / "mc.jsonl"), "--device", "cpu"])
    assert json.loads(capsys.readouterr().out)["mc_num"] == CHOICE_MC_NUM
