"""The data section of the config, and composing the shared `conf/` tree outside a Hydra app."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class DataConfig:
    source: str  # demo
    dir: str  # shards, manifest.json and tokenizer.json
    tokenizer: Optional[str]  # a tokenizer.json; None = train a BPE on the corpus
    vocab_size: int  # for a trained tokenizer
    seq_len: int
    shard_bytes: int
    heldout_fraction: float
    shuffle_buffer: int
    num_workers: int


def compose(overrides: list[str]) -> DictConfig:
    """The config that `python -m pretrain.train OVERRIDES...` would see, without the `hydra` node."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve as in a run
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
