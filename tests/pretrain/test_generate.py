import torch

from pretrain.objective.sampler import generate, tokens_per_step

MASK = 0


def test_tokens_per_step_spreads_evenly():
    assert tokens_per_step(10, 4) == [3, 3, 2, 2]
    assert sum(tokens_per_step(33, 33)) == 33


def test_reveals_the_most_confident_positions_first():
    # A fake "model" that always predicts token (position + 1), with confidence rising with position.
    reveal_order = []

    def forward(x):
        B, L = x.shape
        logits = torch.full((B, L, 40), -10.0)
        for pos in range(L):
            logits[:, pos, pos + 1] = float(pos)  # later positions are more confident
        reveal_order.append((x[0] == MASK).nonzero().flatten().tolist())
        return logits

    prompt = torch.tensor([[7, 8]])
    out = generate(forward, prompt, gen_length=6, steps=3, mask_id=MASK)
    assert out.tolist() == [[7, 8, 3, 4, 5, 6, 7, 8]]
    # step 1 sees all 6 masked; the two most confident (last two) are revealed first
    assert reveal_order == [[2, 3, 4, 5, 6, 7], [2, 3, 4, 5], [2, 3]]


def test_temperature_samples_and_is_seeded():
    def forward(x):  # a flat distribution over tokens 1..9 everywhere
        logits = torch.full((*x.shape, 10), 0.0)
        logits[..., MASK] = -5.0
        return logits

    prompt = torch.tensor([[5]])
    greedy = generate(forward, prompt, 12, 4, MASK)
    a = generate(forward, prompt, 12, 4, MASK, temperature=1.0, seed=1)
    b = generate(forward, prompt, 12, 4, MASK, temperature=1.0, seed=1)
    assert torch.equal(a, b) and (a[0, 1:] != MASK).all()
    assert len(set(a[0, 1:].tolist())) > 2 and len(set(greedy[0, 1:].tolist())) == 1


# -- the published generate.py's semantics --------------------------------------------------------
import json  # noqa: E402

import pytest  # noqa: E402

from pretrain.generate import main  # noqa: E402
from pretrain.hf.pretrained import open_source  # noqa: E402
from pretrain.objective.sampler import GenerateError, cut_completion, num_transfer_tokens  # noqa: E402


class Recorder:
    """A fake model: confident about later positions, predicting (position + 1); records its inputs."""

    def __init__(self, vocab=40):
        self.inputs, self.vocab = [], vocab

    def __call__(self, x):
        self.inputs.append(x.clone())
        B, L = x.shape
        logits = torch.full((B, L, self.vocab), -10.0)
        for pos in range(L):
            logits[:, pos, pos + 1] = float(pos)
        return logits


def test_num_transfer_tokens_spreads_each_rows_masks():
    masks = torch.zeros(2, 8, dtype=torch.bool)
    masks[0, :7] = True
    masks[1, :2] = True
    assert num_transfer_tokens(masks, 3).tolist() == [[3, 2, 2], [1, 1, 0]]


def test_blocks_are_revealed_left_to_right_on_schedule():
    model = Recorder()
    prompt = torch.tensor([[7, 8]])
    out = generate(model, prompt, gen_length=8, steps=4, mask_id=MASK, block_length=4)
    masked = [(x[0] == MASK).nonzero().flatten().tolist() for x in model.inputs]
    # block 1 (positions 2-5) in 2 steps of 2, the most confident first; block 2 waits
    assert masked == [[2, 3, 4, 5, 6, 7, 8, 9], [2, 3, 6, 7, 8, 9], [6, 7, 8, 9], [6, 7]]
    assert out.tolist() == [[7, 8, 3, 4, 5, 6, 7, 8, 9, 10]]


def test_prompt_is_untouched_and_calls_do_not_depend_on_the_data():
    prompts = [torch.tensor([[MASK + 1, 5, 6]]), torch.tensor([[9, 9, 9], [1, 2, 3]])]
    for prompt in prompts:
        model = Recorder()
        out = generate(model, prompt, gen_length=6, steps=6, mask_id=MASK, block_length=3, remasking="random", seed=3)
        assert torch.equal(out[:, :3], prompt) and (out[:, 3:] != MASK).all()
        assert len(model.inputs) == 6  # ZeRO-3: every rank calls the model steps times


def test_cfg_masks_the_prompt_in_the_unconditional_pass_and_scale_zero_is_no_cfg():
    torch.manual_seed(0)
    table = torch.randn(40, 40)

    def model(x):  # depends on the prompt: position logits are a function of the first token
        return table[x[:, :1]].expand(*x.shape, 40) + torch.arange(x.shape[1])[None, :, None] * 0.01

    prompt = torch.tensor([[3, 4]])
    rec = Recorder()
    generate(rec, prompt, gen_length=4, steps=2, mask_id=MASK, cfg_scale=1.5)
    conditional, unconditional = rec.inputs[0]
    assert len(rec.inputs[0]) == 2 and (unconditional[:2] == MASK).all() and (conditional[:2] == prompt[0]).all()
    assert torch.equal(conditional[2:], unconditional[2:])
    plain = generate(model, prompt, 4, 4, MASK)
    assert torch.equal(generate(model, prompt, 4, 4, MASK, cfg_scale=0.0), plain)
    guided = generate(model, prompt, 4, 4, MASK, cfg_scale=3.0)
    u = table[MASK].clone()
    u[MASK] = float("-inf")
    expected = (u + 4.0 * (table[3] - table[MASK])).clone()
    expected[MASK] = float("-inf")
    assert guided[0, 2].item() == expected.argmax().item()


@pytest.mark.parametrize("kwargs, message", [
    (dict(gen_length=10, steps=4, block_length=4), "gen_length=10 is not divisible by block_length=4"),
    (dict(gen_length=8, steps=3, block_length=4), "steps=3 is not divisible by the number of blocks"),
    (dict(gen_length=8, steps=4, remasking="top_k"), "remasking='top_k' is not one of"),
])
def test_settings_errors(kwargs, message):
    with pytest.raises(GenerateError, match=message):
        generate(Recorder(), torch.tensor([[1]]), mask_id=MASK, **kwargs)


def test_cli_from_a_run_and_from_its_export_agree(trained_run, tmp_path, capsys):
    from pretrain.export import export

    export(trained_run, tmp_path / "hf", dtype="fp32")
    (tmp_path / "prompts.txt").write_text("The\nA long prompt about the module\n\n")
    outputs = []
    for source in (trained_run, tmp_path / "hf"):
        main([str(source), "--prompts-file", str(tmp_path / "prompts.txt"), "--prompt", "x", "--gen-length", "8",
              "--steps", "4", "--block-length", "4", "--batch-size", "2", "--device", "cpu"])
        outputs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])

    def sample(line):  # all but the settings, which name the source
        return {k: v for k, v in line.items() if k != "settings"}

    assert [sample(o) for o in outputs[0]] == [sample(o) for o in outputs[1]]
    assert [o["prompt"] for o in outputs[0]] == ["x", "The", "A long prompt about the module"]
    assert outputs[0][0]["settings"]["step"] == 30 and outputs[1][0]["settings"]["step"] is None


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)  # precision plays no part here
def test_cli_errors(trained_run, tmp_path, capsys):
    def fails(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "exceeds the model's maximum 1024" in fails(trained_run, "--prompt", "word " * 1100, "--gen-length", "8",
                                                       "--steps", "8")
    assert "not divisible by block_length=3" in fails(trained_run, "--prompt", "a", "--gen-length", "8",
                                                      "--block-length", "3")
    assert "no prompt" in fails(trained_run)
    assert "no such file" in fails(trained_run, "--prompts-file", tmp_path / "nope.txt")
    assert "neither a run directory" in fails(tmp_path, "--prompt", "a")


def test_sample_at_end_settings_are_checked_before_training():
    from pretrain.checks import compose_config
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="sample: gen_length=32 is not divisible by block_length=5"):
        compose_config(["sample.at_end=true", "sample.block_length=5"])
    compose_config(["sample.at_end=false", "sample.block_length=5"])  # not sampling: the relation is not checked
    # Each value's own range is checked either way (pretrain/domains.py)
    with pytest.raises(ConfigError, match="sample.steps=0 must be positive"):
        compose_config(["sample.at_end=false", "sample.steps=0"])


def test_cut_completion_at_eos_then_before_the_first_stop():
    def decode(ids):
        return "".join(chr(ord("a") + i) for i in ids)

    assert cut_completion([0, 1, 2, 3, 9, 4], decode, 9) == ([0, 1, 2, 3], "abcd", "eos")
    assert cut_completion([0, 1, 2, 3, 4], decode, 9) == ([0, 1, 2, 3, 4], "abcde", "length")
    assert cut_completion([0, 1, 2, 3, 4], decode, 9, ["cd", "b"]) == ([0, 1], "a", "stop")  # the earliest stop
    assert cut_completion([0, 1, 2, 3, 4], decode, 9, ["zz", "de"]) == ([0, 1, 2, 3, 4], "abc", "stop")
    assert cut_completion([0, 9, 2, 3], decode, 9, ["cd"]) == ([0], "a", "eos")  # nothing after EOS counts


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)  # precision plays no part here
def test_jsonl_records_ids_and_settings_and_stop_cuts(trained_run, capsys):
    prompt = "Return a new list containing all"
    common = [str(trained_run), "--prompt", prompt, "--gen-length", "8", "--steps", "4", "--device", "cpu"]
    main(common)
    full = json.loads(capsys.readouterr().out)
    tok = open_source(trained_run).tokenizer()
    assert tok.decode(full["prompt_ids"]) == prompt and tok.decode(full["completion_ids"]) == full["completion"]
    assert full["finish"] in ("eos", "length") and full["completion"]  # this prompt gets a completion
    assert full["settings"] == {"gen_length": 8, "steps": 4, "block_length": 8, "temperature": 0.0, "cfg_scale": 0.0,
                                "remasking": "low_confidence", "threshold": None,
                                "factor": None, "cache": "none", "stop": [], "batch_size": 8, "dtype": "float32",
                                "source": str(trained_run / "checkpoints" / "step00000030"), "step": 30, "seed": 0}
    stop = full["completion"][len(full["completion"]) // 2]
    main([*common, "--stop", stop, "--stop", "never there"])
    cut = json.loads(capsys.readouterr().out)
    assert cut["finish"] == "stop" and cut["completion"] == full["completion"][: full["completion"].index(stop)]
    assert full["completion_ids"][: len(cut["completion_ids"])] == cut["completion_ids"]
    assert stop in tok.decode(cut["completion_ids"]) and stop not in tok.decode(cut["completion_ids"][:-1])
    main([*common, "--output", "text"])
    assert capsys.readouterr().out == prompt + full["completion"] + "\n\n"


def test_a_prompts_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a prompt\n\xff\xfe latin-1 \xe9\n")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--prompts-file", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"error: --prompts-file {bad}: not UTF-8 text (byte 0xff at offset 9)" in err
