"""Export a run's checkpoint as a Hugging Face folder in LLaDA's published format.

    python -m pretrain.export RUN_DIR OUT_DIR [--step N] [--dtype bf16|fp32] [--max-shard-size 5GB]
                              [--code-repo GSAI-ML/LLaDA-8B-Base]

OUT_DIR gets config.json (every key of GSAI-ML/LLaDA-8B-Base's), the weights as safetensors (named
model.transformer..., one file, or several with model.safetensors.index.json above --max-shard-size),
tokenizer.json, tokenizer_config.json, special_tokens_map.json, and this project's modeling code,
configuration_llada.py and modeling_llada.py (pretrain/hf/modeling/), which config.json's auto_map
names: `AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True)` (or AutoModelForCausalLM) loads
it offline with only torch and transformers installed. --code-repo REPO points auto_map at a Hub
repository's modeling code instead (the published one: GSAI-ML/LLaDA-8B-Base); the files are still
copied. --local-code (the default) is kept for old command lines.

Runs on the CPU without a GPU and without DeepSpeed's process group. Peak memory: one parameter.
The ZeRO-3 shards are memory-mapped (never loaded whole; the pages read stay in the page cache, which
the kernel can drop), each parameter is assembled from its slices, cast, and written straight into
its safetensors file, before the next is read (bench/export_memory.py, BENCHMARKS.md). The folder
is written under a temporary name and renamed at the end, so OUT_DIR is either complete or absent;
an existing non-empty OUT_DIR is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from data_pipeline.shards import DataError
from data_pipeline.tokenizer import eos_token, mask_token
from pretrain.checkpoint.zero_files import CheckpointError
from pretrain.hf.format import (
    DTYPES,
    PUBLISHED_CODE_REPO,
    FormatError,
    hf_config,
    parse_size,
    write_tokenizer,
    write_weights,
)
from pretrain.hf.modeling import MODELING_FILES
from pretrain.hf.moe_format import export_llada2
from pretrain.hf.pretrained import SourceError, check_shapes, open_source


def export(source_path: str | Path, out_dir: str | Path, step: int | None = None, dtype: str = "bf16",
           max_shard_size: str | int = "5GB", code_repo: str | None = None) -> dict:
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"--max-shard-size={max_shard_size!r} must be positive")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} already exists and is not empty; choose another OUT_DIR")
    source = open_source(source_path, step)
    shapes = source.shapes()
    check_shapes(shapes, source.model, str(source.checkpoint_dir or source.path))
    tokenizer = source.tokenizer()
    eos, mask = eos_token(tokenizer), mask_token(tokenizer)
    if tokenizer.token_to_id(eos) != source.eos_id or tokenizer.token_to_id(mask) != source.mask_id:
        raise ValueError(f"{source.tokenizer_path}: EOS/MASK ids differ from the run's ({source.eos_id}, "
                         f"{source.mask_id})")

    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if source.model.moe is not None:  # LLaDA 2.0's MoE format, with its own modeling code (one file)
            files = export_llada2(tmp, {**dict(source.tensors()), **source.buffers()}, source.model, source.eos_id,
                                  source.mask_id, DTYPES[dtype])
        else:
            files = write_weights(tmp, shapes, source.tensors(), DTYPES[dtype], max_bytes)
            config = hf_config(source.model, source.eos_id, source.mask_id, DTYPES[dtype], code_repo)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_tokenizer(tmp, tokenizer.to_str(), eos, mask, source.model.max_sequence_length)
        # Where the weights came from, beside config.json (which keeps exactly the published keys):
        # model.init_from prints it when a run starts from this folder.
        (tmp / "export.json").write_text(json.dumps({"source": str(source.checkpoint_dir or source.path),
                                                     "step": source.step, "dtype": dtype}, indent=1) + "\n")
        for name, path in (MODELING_FILES.items() if source.model.moe is None else ()):  # MoE: its own code
            shutil.copyfile(path, tmp / name)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out_dir": str(out_dir), "source": str(source.checkpoint_dir or source.path), "step": source.step,
            "dtype": dtype, "files": files, "params": sum(s.numel() for s in shapes.values())}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (or an exported folder, to re-shard or re-cast)")
    parser.add_argument("out_dir")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint at this step (default: newest)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this size")
    code = parser.add_mutually_exclusive_group()
    code.add_argument("--code-repo", default=None, help="point auto_map at this Hub repository's "
                      f"configuration_llada.py/modeling_llada.py (e.g. {PUBLISHED_CODE_REPO}) instead of the copies")
    code.add_argument("--local-code", action="store_true", help="auto_map names the copies in OUT_DIR (the default)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = export(args.run_dir, args.out_dir, args.step, args.dtype, args.max_shard_size,
                         None if args.local_code else args.code_repo)
    except (ValueError, DataError, FormatError, SourceError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main(sys.argv[1:])
