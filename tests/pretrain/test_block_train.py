"""Block diffusion through the real entry point: 2 ranks, ZeRO-3, a block-size schedule, resumed."""

from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import BLOCK_SAMPLE_PROMPTS, read_metrics, train_losses


def test_a_resume_across_a_block_size_change_gives_the_uninterrupted_losses(block_run):
    straight, resumed, stdout = block_run
    assert "at step 2" in stdout
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    for step in (3, 4):
        assert abs(b[step] - a[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


def test_the_step_line_and_metrics_show_the_block_size(block_run):
    straight, _, stdout = block_run
    sizes = {r["step"]: r["block_size"] for r in read_metrics(straight) if "loss" in r}
    assert sizes == {1: 4, 2: 4, 3: 16, 4: 16}
    assert "block 16" in stdout
    assert yaml.safe_load((straight / "config.yaml").read_text())["block"]["schedule"]["points"] == [[0, 4], [2, 16]]


def test_the_in_run_sample_of_a_block_model_keeps_two_ranks_in_step_with_a_threshold_and_the_cache(block_run):
    """Each rank decodes its own prompt, block by block with the exact cache; with a threshold that commits a
    whole piece per pass, the ranks need different numbers of passes, and the one done first keeps making
    passes (ZeRO-3 gathers in each, persistence threshold 0) until the other is done: no hang."""
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.objective.sampler import pieces

    straight, resumed, stdout = block_run
    data_dir = yaml.safe_load((resumed / "config.yaml").read_text())["data"]["dir"]
    tok = load_tokenizer(Path(data_dir) / "tokenizer.json", root=data_dir)
    needed = [len(pieces(len(tok.encode(p).ids), 8, 16)) for p in BLOCK_SAMPLE_PROMPTS]
    assert needed[0] != needed[1]  # the ranks really differ
    expected = ", ".join(f"{n}/{max(needed)}" for n in needed)
    assert f"sample: passes per rank (needed by its own prompts/made): {expected}" in stdout
    samples = [line for line in stdout.splitlines() if line.startswith("sample: '")]
    assert len(samples) == 2 and samples[0].startswith("sample: 'The") and "five" in samples[1]


def test_the_block_model_exports_loads_offline_through_the_shipped_code_and_samples(block_run, tmp_path, monkeypatch,
                                                                                       capsys):
    import json

    import torch
    from transformers import AutoModel

    from pretrain import generate
    from pretrain.export import export
    from pretrain.hf.pretrained import load_model, open_source

    straight, _, _ = block_run
    assert yaml.safe_load((straight / "config.yaml").read_text())["model"]["block_size"] == 16  # the last step's
    folder = tmp_path / "hf"
    export(straight, folder, dtype="fp32")
    assert json.loads((folder / "config.json").read_text())["block_size"] == 16
    assert open_source(folder).model.block_size == 16
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    shipped = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype="auto").eval()
    ours = load_model(open_source(straight))
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids, block_size=16)
        got = shipped(ids).logits
        assert (got - want).abs().max() <= 1e-5
        assert (ours(ids) - want).abs().max() > 1e-3  # the block-causal mask is applied, not full attention
    lines = {}
    for cache in ("none", "block"):
        generate.main([str(folder), "--prompt", "The", "--gen-length", "20", "--steps", "20", "--cache", cache])
        lines[cache] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    line = lines["none"]
    assert len(line["completion_ids"]) <= 20 and line["finish"] in ("eos", "length")
    assert lines["block"]["completion_ids"] == line["completion_ids"]  # the exact cache
    # the shipped generate() is our block sampler, with and without its cache
    from pretrain.objective.sampler import generate_block_rows, left_pad

    padded, prompt_mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]], 0)
    want = generate_block_rows(ours, padded, prompt_mask, 12, 12, open_source(folder).mask_id, 16, threshold=0.5)
    mask = torch.ones_like(padded) if prompt_mask is None else prompt_mask.long()
    for cache in (None, "block"):
        got = shipped.generate(padded, mask, gen_length=12, steps=12, threshold=0.5, cache=cache)
        assert torch.equal(got, want), cache


def test_lm_eval_generates_from_a_block_model_with_the_exact_cache_as_without(block_run, monkeypatch):
    """generate_until of the llada harness: cache=block gives the completions of no cache, which are the
    block sampler's for each prompt alone (batched requests, left-padded, decoded row by row)."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # one process, whatever an earlier test left in the env
        monkeypatch.delenv(key, raising=False)
    from lm_eval.api.instance import Instance

    from pretrain.hf.harness import LLaDAHarness
    from pretrain.objective.sampler import cut_completion, generate_blocks

    straight, _, _ = block_run
    contexts = ["The", "one two three four five", "A module that"]
    requests = [Instance("generate_until", {}, (c, {"until": []}), i, task_name="t", doc_id=0)
                for i, c in enumerate(contexts)]
    texts = {}
    for cache in ("none", "block"):
        lm = LLaDAHarness(source=str(straight), gen_length=12, steps=12, threshold=0.5, cache=cache, dtype="fp32",
                          device="cpu", batch_size=3)
        texts[cache] = lm.generate_until(requests)
    assert texts["block"] == texts["none"]
    source, model = lm.source, lm.model
    for context, text in zip(contexts, texts["none"], strict=True):
        ids = torch.tensor([lm.encode(context)])
        row = generate_blocks(model, ids, 12, 12, source.mask_id, 16, seed=0, threshold=0.5)[0, ids.shape[1]:]
        assert text == cut_completion(row.tolist(), lm.tok.decode, source.eos_id)[1]
    with pytest.raises(ValueError, match="llada model arg cache=dual: this is a block diffusion model"):
        LLaDAHarness(source=str(straight), cache="dual", device="cpu")
