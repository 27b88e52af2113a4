#!/bin/bash
# Submit the shard build as a SLURM array of TASKS tasks plus the merge step that waits for it.
#   launch/slurm/build_shards.sh TASKS [data_pipeline.build overrides...]
# Extra sbatch options (partition, account, time) go in SBATCH_* environment variables, e.g.
# SBATCH_PARTITION=cpu SBATCH_TIMELIMIT=12:00:00; CPUS_PER_TASK sets each task's cores (and build
# workers; default 8, from the .sbatch header). Prints the two job ids.
set -euo pipefail
TASKS="${1:?usage: build_shards.sh TASKS [overrides...]}"
shift
HERE="$(cd "$(dirname "$0")" && pwd)"
export LLADA_ROOT="${LLADA_ROOT:-$(cd "$HERE/../.." && pwd)}"
array=$(sbatch --parsable --array=0-$((TASKS - 1)) ${CPUS_PER_TASK:+--cpus-per-task=$CPUS_PER_TASK} --export=ALL \
  "$HERE/build_shards.sbatch" "$@")
merge=$(sbatch --parsable --dependency=afterok:"${array%%;*}" --kill-on-invalid-dep=yes \
  --job-name=build-shards-merge --cpus-per-task=1 --export=ALL,MERGE=1,TASKS="$TASKS" \
  "$HERE/build_shards.sbatch" "$@")
echo "array ${array%%;*} merge ${merge%%;*}"
