#!/bin/bash
# A two-node SLURM cluster on this machine, loopback only, to try the SLURM path (root; Debian's
# slurm-wlm: `make system-deps`). See launch/local_cluster.py.
#   launch/slurm/local_cluster.sh up [--nodes 2] [--dir /tmp/llada-slurm]   # then: export SLURM_CONF=...
#   launch/slurm/local_cluster.sh down [--dir /tmp/llada-slurm]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m launch.local_cluster "$@"
