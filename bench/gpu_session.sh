#!/usr/bin/env bash
# One call on a bare GPU machine (torch installed, no package index; ../shared/gpu/README.md):
# installs the project's other packages from .whl/ (made on the CPU machine by
# `../shared/gpu/wheels.sh .whl`, carried along: it is git-ignored), prints the card, then runs
# bench/gpu.py with the arguments given. Example, the llada_1b diagnosis (about 8 minutes):
#   bash bench/gpu_session.sh --budget 470 --case-timeout 150 \
#       --only llada_1b_fwdbwd llada_1b_accum8 llada_1b_persist llada_1b --profile --trace-dir "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "error: no .whl/*.whl here: run ../shared/gpu/wheels.sh .whl on the CPU machine and carry .whl" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 bench/gpu.py "$@"
