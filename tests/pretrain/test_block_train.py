"""Block diffusion through the real entry point: 2 ranks, ZeRO-3, a block-size schedule, resumed."""

import yaml

from tests.conftest import read_metrics, train_losses


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
    generate.main([str(folder), "--prompt", "The", "--gen-length", "20", "--steps", "20"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(line["completion_ids"]) <= 20 and line["finish"] in ("eos", "length")
