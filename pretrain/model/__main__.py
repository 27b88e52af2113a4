"""`python -m pretrain.model model=llada_8b`: the parameter counts of a model= as one JSON line.

The model is built on the meta device (no memory, no data); the counts are the paper's (non-embedding:
without the input embedding and the output head).
"""

from __future__ import annotations

import json
import sys

import torch

from data_pipeline.cli import add_overrides, parser
from data_pipeline.shards import DataError
from pretrain.checks import compose_config, resolve_vocab
from pretrain.config import ConfigError
from pretrain.model.transformer import LLaDAModel, count_params


def main(argv: list[str]) -> None:
    p = parser("pretrain.model", "Builds the model on the meta device (no memory, no data) and prints its parameter "
               "counts as one JSON line.")
    add_overrides(p)
    try:
        cfg = compose_config(p.parse_args(argv).overrides)
        resolve_vocab(cfg)
    except (ConfigError, DataError) as e:  # an unknown key, a bad value: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with torch.device("meta"):
        model = LLaDAModel(cfg.model)
    print(json.dumps({"model": cfg.model.name, **count_params(model)}))


if __name__ == "__main__":
    main(sys.argv[1:])
