#!/bin/bash
# Submit a training run from a login node (see docs/slurm.md): the same as `python -m launch.submit`.
#   launch/slurm/submit.sh [--dry-run] cluster=slurm cluster.slurm.partition=gpu model=llada_1b ...
# PYTHON picks the interpreter (default: python). The job runs in the current directory.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m launch.submit "$@"
