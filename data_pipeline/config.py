"""The data section of the config, and composing the shared `conf/` tree outside a Hydra app."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def path_slug(text: str, limit: int = 96) -> str:
    """A string made safe as one directory name: `/` and other odd characters become `_`, and a long
    one is cut and given a hash of the whole, so distinct inputs stay distinct."""
    slug = re.sub(r"[^A-Za-z0-9=,.+_-]+", "_", text).strip("._") or "default"
    if len(slug) > limit:
        slug = f"{slug[:limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return slug


# conf/config.yaml names the default run directory after the command-line overrides with ${slug:...}.
if not OmegaConf.has_resolver("slug"):
    OmegaConf.register_new_resolver("slug", path_slug)


@dataclass
class DataConfig:
    source: str  # demo
    dir: str  # shards, manifest.json and tokenizer.json
    tokenizer: str | None  # a tokenizer.json; None = train a BPE on the corpus
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
