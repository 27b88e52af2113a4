"""Benchmarks with lm-evaluation-harness: `python -m pretrain.lm_eval`.

    python -m pretrain.lm_eval SOURCE --tasks TASK[,TASK...] [--model_args mc_num=128,seed=0,...]
        [lm-eval's own flags: --num_fewshot, --limit, --batch_size, --device, --output_path,
         --include_path DIR (local task YAMLs), --log_samples, --gen_kwargs, ...]
    torchrun --nproc_per_node 8 -m pretrain.lm_eval SOURCE --tasks ...   # processes share the documents

SOURCE is a run directory (its newest checkpoint; `--model_args step=N` for another) or an exported
folder. This registers the model `llada` (pretrain/hf/harness.py, where each request type's estimator
is described) and runs lm-eval's command line with `--model llada`, SOURCE as the model arg `source`,
`--batch_size 32` and `--device auto` (CUDA when there is one; under torchrun each process's own GPU)
unless given. Model args: mc_num (128), batch_size (sequences per forward pass; generate_until's
requests per forward), seed (0), check_greedy (true), gen_length, steps, block_length, cfg, remasking,
temperature, threshold, factor, cache (none|prefix|dual|block: fast sampling, docs/fast_sampling.md) (the
generation defaults a task's gen_kwargs override), dtype (auto|bf16|fp32). Needs the `hf` extra
(`pip install -e '.[hf]'`: lm-eval).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def lm_eval_argv(argv: list[str]) -> list[str]:
    """Our command line -> lm-eval's (without the program name)."""
    if not argv or argv[0].startswith("-"):
        raise ValueError("give SOURCE (a run directory or an exported folder) first, then lm-eval's flags")
    source, rest = argv[0], list(argv[1:])
    for i, arg in enumerate(rest):
        name, _, value = arg.partition("=")
        if name == "--model" and (value or (rest[i + 1] if i + 1 < len(rest) else "")) != "llada":
            raise ValueError(f"--model: this command runs the model `llada` (SOURCE={source}); leave --model out")
    if not any(a.split("=")[0] in ("--tasks", "-t") for a in rest):
        raise ValueError("give --tasks (lm-eval's task names, or the names in an --include_path folder's YAMLs)")
    model = [] if any(a.split("=")[0] == "--model" for a in rest) else ["--model", "llada"]
    given = {a.split("=")[0] for a in rest}
    batch = [] if given & {"--batch_size", "-b"} else ["--batch_size", "32"]
    device = [] if "--device" in given else ["--device", "auto"]  # lm-eval's default is cuda:0, even without CUDA
    return ["run", *model, *batch, *device, *rest, "--model_args", json.dumps({"source": source})]


USAGE = "usage: python -m pretrain.lm_eval SOURCE --tasks TASK[,TASK...] [lm-eval's flags]"


def main(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE + "\n\n" + __doc__.strip() + "\n\nlm-eval's flags: python -m lm_eval run --help")
        return
    try:
        args = lm_eval_argv(argv)
    except ValueError as e:
        print(f"{USAGE}\nerror: {e}", file=sys.stderr)
        sys.exit(2)
    from data_pipeline.shards import DataError
    from pretrain.checkpoint.zero_files import CheckpointError
    from pretrain.hf.folder_check import check_model_folder
    from pretrain.hf.format import FormatError
    from pretrain.hf.pretrained import SourceError

    refused = (SourceError, FormatError, CheckpointError, DataError)  # SOURCE refused as generate refuses it
    try:
        if (Path(argv[0]) / "config.json").exists():  # a folder: checked in a second, before lm-eval starts
            check_model_folder(argv[0])
    except refused as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("error: lm-eval is not installed: pip install -e '.[hf]'", file=sys.stderr)
        sys.exit(2)
    import pretrain.hf.harness  # noqa: F401  registers the model `llada`

    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except refused as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
