"""pretrain/engine.py: the ranks' identity when srun starts them without a launcher."""

import os

from pretrain.engine import world_size_from_env


def test_ranks_started_by_srun_take_their_ids_from_slurm(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    assert world_size_from_env() == 16
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "16", "1")


def test_a_launcher_s_ranks_win_over_slurm_task_ids(monkeypatch):
    # Under srun + deepspeed/torchrun, SLURM_PROCID is the node's launcher task; RANK is the rank.
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    assert world_size_from_env() == 4 and os.environ["RANK"] == "3"
