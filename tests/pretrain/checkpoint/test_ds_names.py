"""DeepSpeed's checkpoint file names for every precision it writes: the one place that knows them."""

import pytest

from pretrain.checkpoint import ds_names
from pretrain.checkpoint.files import owner_rank


@pytest.mark.parametrize("name,kind,rank,prefix", [
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "optim", 0, ""),
    ("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt", "optim", 12, "bf16_"),
    ("fp16_zero_pp_rank_3_mp_rank_00_optim_states.pt", "optim", 3, "fp16_"),
    ("zero_pp_rank_7_mp_rank_00_model_states.pt", "model", 7, ""),
    ("mp_rank_00_model_states.pt", "model", None, ""),
])
def test_names_of_every_precision(name, kind, rank, prefix):
    parsed = ds_names.parse(name)
    assert (parsed.kind, parsed.rank, parsed.mp_rank, parsed.prefix) == (kind, rank, 0, prefix)
    assert owner_rank(name) == (rank or 0)


@pytest.mark.parametrize("name", ["manifest.json", "trainer_state_rank1.json", "mp_rank_00_optim_states.pt",
                                  "zero_pp_rank_x_mp_rank_00_optim_states.pt", "zero_pp_rank_0_optim_states.pt",
                                  "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt.tmp"])
def test_other_files_are_not_deepspeeds(name):
    assert ds_names.parse(name) is None


def test_files_in_rank_order_whatever_the_prefix(tmp_path):
    for rank in (0, 1, 2, 10):
        (tmp_path / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
        (tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").touch()
    (tmp_path / "notes_optim_states.pt").touch()
    assert [p.name.split("_")[4] for p in ds_names.optim_files(tmp_path)] == ["0", "1", "2", "10"]
    assert [ds_names.rank_of(p.name) for p in ds_names.model_files(tmp_path)] == [0, 1, 2, 10]
    assert ds_names.has_model_states(tmp_path) and not ds_names.has_model_states(tmp_path / "nowhere")
