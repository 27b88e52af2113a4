"""The paths a job's ranks will resolve, resolved on the login node as the nodes will, before submission.

A run is one directory: every rank must resolve run_dir (and data.dir, model.init_from, the log
directory) to the same path. A value built from something that differs per rank or per node, such as
`run_dir=out_${oc.env:RANK}` or Hydra's `${now:%H-%M-%S}` (each process reads its own clock), made each
rank write a directory of its own: exit 0 and every checkpoint unusable. So each path is resolved
here once per imagined rank (rank 0, another rank of node 0, the first rank of node 1), with the
variables a launcher sets per rank and a clock that differs per process; a path that comes out
different is refused in one line before anything is submitted. Relative paths need nothing more: the
job runs in the directory the submitter ran in (sbatch --chdir).
"""

from __future__ import annotations

import copy
import datetime
import os
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.config import ConfigError

# The ones a default may derive from first (the default run_dir is named after the overrides).
PATH_KEYS = ("data.dir", "model.init_from", "run_dir", "cluster.slurm.log_dir")
# What the launchers (deepspeed, torchrun, srun, mpirun) set differently per rank or per node.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "ROLE_RANK", "SLURM_PROCID", "SLURM_NODEID",
                  "SLURM_LOCALID", "SLURMD_NODENAME", "HOSTNAME", "OMPI_COMM_WORLD_RANK",
                  "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK")


def imagined_ranks(gpus_per_node: int) -> list[tuple[str, dict[str, str]]]:
    """(which rank, its per-rank variables) for rank 0, a second rank of node 0 and node 1's first."""
    places = [(0, 0), (0, 1), (1, 0)] if gpus_per_node > 1 else [(0, 0), (1, 0)]
    ranks = []
    for node, local in places:
        rank = node * gpus_per_node + local
        values = {"RANK": rank, "LOCAL_RANK": local, "NODE_RANK": node, "GROUP_RANK": node, "ROLE_RANK": rank,
                  "SLURM_PROCID": node, "SLURM_NODEID": node, "SLURM_LOCALID": 0, "SLURMD_NODENAME": f"node{node}",
                  "HOSTNAME": f"node{node}", "OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_LOCAL_RANK": local,
                  "PMI_RANK": rank}
        ranks.append((f"rank {rank} (node {node})", {k: str(v) for k, v in values.items()}))
    return ranks


@contextmanager
def as_rank(variables: dict[str, str], clock: datetime.datetime):
    """The environment and `now` resolver of one imagined rank; the real ones are restored after."""
    from hydra.core.utils import setup_globals

    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    OmegaConf.register_new_resolver("now", lambda pattern: clock.strftime(pattern), replace=True)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        setup_globals()  # Hydra's own `now` (and its other resolvers) back


def _raw(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node._value() if node is not None else None


def check_same_on_every_rank(cfg: DictConfig, gpus_per_node: int) -> None:
    """Refuses (ConfigError, one line) a path key whose value would differ between the job's ranks."""
    seen: dict[str, tuple[str, str]] = {}
    start = datetime.datetime(2031, 1, 1)
    for i, (who, variables) in enumerate(imagined_ranks(gpus_per_node)):
        # Each imagined process starts at another day, hour, minute and second: any ${now:...} differs.
        clock = start + i * datetime.timedelta(days=1, hours=1, minutes=1, seconds=1, microseconds=1)
        mine = copy.deepcopy(cfg)  # no resolver cache shared between the imagined ranks
        with as_rank(variables, clock):
            for key in PATH_KEYS:
                try:
                    value = OmegaConf.select(mine, key, throw_on_missing=False)
                except OmegaConfBaseException:  # e.g. a variable no launcher sets: named when the config loads
                    continue
                value = None if value is None else str(value)
                if key not in seen:
                    seen[key] = (who, value)
                elif seen[key][1] != value:
                    first, path = seen[key]
                    raise ConfigError(f"{key}={_raw(cfg, key)!r} differs between the job's ranks ({path!r} on {first}, "
                                      f"{value!r} on {who}): a run is one directory that every rank shares; use a "
                                      f"value that is the same on every node")
