"""Every command that opens a model folder checks it before building anything (issue 26, classes 2
and 6): config.json's values against the training config's domain table, its sizes against the
safetensors headers (read alone, size-capped), and every file inside the folder as a regular file.
The folder is written here from a tiny model's shapes (zeros), so no training is needed."""

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from pretrain.checks import compose_config
from pretrain.config import ConfigError
from pretrain.hf.folder_check import check_model_folder, expected_shapes
from pretrain.hf.folder_files import INDEX, WEIGHTS, FormatError
from pretrain.hf.format import hf_config, write_weights
from tests.pretrain.checkpoint.test_hostile_files import SECRET, within

TINY = ["model=tiny", "model.vocab_size=256"]


def write_folder(folder: Path, overrides=(), max_bytes: int = 10**9) -> Path:
    cfg = compose_config([*TINY, *overrides]).model
    shapes = expected_shapes(cfg)
    folder.mkdir(parents=True)
    write_weights(folder, shapes, ((n, torch.zeros(s)) for n, s in shapes.items()), torch.float32, max_bytes)
    (folder / "config.json").write_text(json.dumps(hf_config(cfg, 1, 2, torch.float32, None)))
    return folder


def edit_config(folder: Path, **values) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "model")


def test_a_good_folder_passes(folder):
    _, model = check_model_folder(folder)
    assert (model.n_layers, model.d_model, model.vocab_size) == (4, 128, 256)


@pytest.mark.parametrize("values, message", [
    ({"n_layers": 100000}, "n_layers=100000, but the weights hold 4 blocks"),  # built for minutes before
    ({"n_heads": 0}, "model.n_heads=0 must be positive"),  # a ZeroDivisionError before
    ({"n_kv_heads": 0}, "model.n_kv_heads=0 must be positive"),
    ({"rms_norm_eps": -1.0}, "model.rms_norm_eps=-1.0 must be a positive number"),
    ({"rope_theta": 0.0}, "model.rope_theta=0.0 must be a positive number"),
    ({"n_kv_heads": 3}, "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
    ({"mlp_hidden_size": 512}, "transformer.blocks.0.ff_proj.weight has shape [352, 128], the config gives [512, 128]"),
    ({"vocab_size": 512, "embedding_size": 512}, "model.transformer.wte.weight has shape [256, 128], the config"),
    ({"n_layers": "four"}, "a value of the wrong type"),
])
def test_a_config_json_that_lies_is_one_line_before_anything_is_built(folder, values, message):
    edit_config(folder, **values)
    with within(10), pytest.raises(FormatError) as err:
        check_model_folder(folder)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(str(folder))


def test_the_weights_are_checked_for_every_name(folder, tmp_path):
    other = write_folder(tmp_path / "other", ["model.n_layers=3"])
    os.replace(other / WEIGHTS, folder / WEIGHTS)
    with pytest.raises(FormatError, match="n_layers=4, but the weights hold 3 blocks"):
        check_model_folder(folder)


@pytest.mark.parametrize("plant, message", [
    ("config-link-outside", "outside"),
    ("config-fifo", "not a regular file (a FIFO)"),
    ("config-large", "larger than"),
    ("index-names-outside", "outside"),
    ("index-names-fifo", "not a regular file"),
    ("header-too-large", "a safetensors header of"),
    ("header-garbage", "the weights cannot be read (the safetensors header does not parse)"),
])
def test_files_of_a_folder_are_read_inside_it_with_caps_and_never_echoed(tmp_path, plant, message):
    folder = write_folder(tmp_path / "model", max_bytes=200_000)  # sharded: an index names the files
    secret = tmp_path / "passwd"
    secret.write_text(SECRET)
    config = folder / "config.json"
    index = json.loads((folder / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    if plant == "config-link-outside":
        config.unlink()
        config.symlink_to(secret)
    elif plant == "config-fifo":
        config.unlink()
        os.mkfifo(config)
    elif plant == "config-large":
        config.write_text(" " * (2 << 20) + "{}")
    elif plant == "index-names-outside":
        index["weight_map"] = {k: "../passwd" for k in index["weight_map"]}
        (folder / INDEX).write_text(json.dumps(index))
    elif plant == "index-names-fifo":
        (folder / first).unlink()
        os.mkfifo(folder / first)
    elif plant == "header-too-large":
        (folder / first).write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    else:
        (folder / first).write_bytes(struct.pack("<Q", 12) + SECRET.encode()[:12])
    with within(10), pytest.raises(FormatError) as err:
        check_model_folder(folder)
    assert message in str(err.value) and SECRET not in str(err.value) and "\n" not in str(err.value)


def test_generate_and_evaluate_refuse_the_folder_in_one_line(folder, capsys):
    from pretrain.evaluate import main as evaluate
    from pretrain.generate import main as generate

    edit_config(folder, n_layers=100000)
    for main, args in ((generate, ["--prompt", "a"]), (evaluate, [])):
        with within(10), pytest.raises(SystemExit) as e:
            main([str(folder), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "n_layers=100000, but the weights hold 4 blocks" in err


def test_init_from_runs_the_same_checks(tmp_path):
    folder = write_folder(tmp_path / "model")
    edit_config(folder, rms_norm_eps=-1.0)
    with pytest.raises(ConfigError, match=r"model.init_from=.*: .*model.rms_norm_eps=-1.0 must be a positive number"):
        compose_config([*TINY, f"model.init_from={folder}"])
    other = write_folder(tmp_path / "other", ["model.mlp_hidden_size=512"])
    os.replace(other / WEIGHTS, folder / WEIGHTS)
    edit_config(folder, rms_norm_eps=1e-5)
    with pytest.raises(ConfigError, match=r"ff_proj.weight has shape \[512, 128\], the config gives \[352, 128\]"):
        compose_config([*TINY, f"model.init_from={folder}"])


def test_lm_eval_refuses_the_folder_in_one_line(folder, capsys):
    from pretrain.lm_eval import main as lm_eval

    edit_config(folder, n_heads=0)
    with within(60), pytest.raises(SystemExit) as e:
        lm_eval([str(folder), "--tasks", "arc_easy", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {folder}/config.json: model.n_heads=0 must be positive\n", err[-2000:]
