r"""Build shards: input files -> documents -> tokens -> packed windows -> webdataset tars + manifest.

    python -m data_pipeline.build data=files data.inputs=[corpus/] data.dir=shards/c4 \
        data.tokenizer=tok.json trainer.seq_len=4096 build.workers=16

Each input file is one unit of work (a *piece*, data_pipeline/piece.py): it is read, tokenized and
packed on its own, into shards named after it, and finishes with a small JSON fragment under
`pieces/`. So the output is the same bytes for any number of workers, a re-run skips the pieces
already done and resumes an interrupted one after its last finished shard, and a SLURM array
(launch/slurm/build_shards.sbatch) gives each task the pieces i with i % tasks == task; the last
step merges the fragments into manifest.json. Documents are assigned to the held-out split by a hash
of their text, so a document is never split between train and held-out.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tokenizers import Tokenizer

from data_pipeline.config import BuildConfig, DataConfig, build_config, compose, data_config
from data_pipeline.merge import merge, plan_path
from data_pipeline.piece import build_piece, piece_done
from data_pipeline.shards import (
    FORMAT_VERSION,
    DataError,
    Manifest,
    atomic_write,
    check_shard_files,
    read_json,
    read_manifest,
)
from data_pipeline.sources import resolve_inputs
from data_pipeline.tokenizer import fingerprint, load_tokenizer, train_on_inputs

# What decides the bytes of the shards: a run or a re-run with other values must not reuse them.
BUILD_KEYS = ("inputs", "format", "text_field", "prompt_field", "response_field", "tokenizer", "vocab_size",
              "seq_len", "shard_bytes", "member_bytes", "heldout_fraction", "on_decode_error")


# The layout of pieces/ (fragments, rests, resume points): pieces of another layout are built again.
LAYOUT = 2


def check_settings(cfg: DataConfig) -> None:
    checks = [(cfg.seq_len > 0, f"data.seq_len={cfg.seq_len} must be positive"),
              (cfg.format in ("text", "sft"), f"data.format={cfg.format!r} is not one of text, sft"),
              (cfg.on_decode_error in ("replace", "skip"),
               f"data.on_decode_error={cfg.on_decode_error!r} is not one of replace, skip"),
              (0 <= cfg.heldout_fraction < 1, f"data.heldout_fraction={cfg.heldout_fraction} must be in [0, 1)"),
              (cfg.shard_bytes >= cfg.member_bytes > 0,
               f"data.shard_bytes={cfg.shard_bytes} must be >= data.member_bytes={cfg.member_bytes} > 0")]
    for ok, message in checks:
        if not ok:
            raise DataError(message)


# -- workers ------------------------------------------------------------------------------------
_worker: dict = {}


def _init_worker(tokenizer_json: str, cfg: dict, settings_id: str, progress_queue) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker (and no warning about the fork)
    _worker.update(tok=Tokenizer.from_str(tokenizer_json), cfg=DataConfig(**cfg), settings=settings_id,
                   queue=progress_queue)


def _run_piece(args: tuple[int, str]) -> dict:
    index, path = args
    put = _worker["queue"].put
    fragment = build_piece(index, path, _worker["cfg"], _worker["tok"], _worker["settings"], lambda n: put((n, 0)))
    put((0, 1))
    return fragment


class Progress:
    """Tokens built, their rate and the inputs done, on stderr: a tqdm bar on a terminal, a plain line
    every `every_s` seconds (and one at the end) otherwise, so a redirected log gets no carriage
    returns."""

    def __init__(self, enabled: bool, pieces: int, every_s: float, stream=sys.stderr):
        self.pieces, self.every_s, self.stream = pieces, every_s, stream
        self.tokens = self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        self.plain = enabled and not stream.isatty()
        if enabled and not self.plain:
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="tok", unit_scale=True, file=stream, desc=f"build ({pieces} inputs)",
                            mininterval=1.0)

    def __call__(self, tokens: int, pieces: int = 0) -> None:
        self.tokens += tokens
        self.done += pieces
        if self.bar is not None:
            self.bar.update(tokens)
            if pieces:
                self.bar.set_postfix_str(f"{self.done}/{self.pieces} inputs", refresh=False)
        elif self.plain and time.monotonic() - self.last >= self.every_s:
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        rate = self.tokens / max(self.last - self.start, 1e-9)
        print(f"build: {self.done}/{self.pieces} inputs, {self.tokens:,} tokens, {rate:,.0f} tok/s, "
              f"{self.last - self.start:.0f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.plain:
            self._line()


def run_pieces(jobs: list[tuple[int, str]], cfg: DataConfig, tok: Tokenizer, settings_id: str,
               bcfg: BuildConfig) -> int:
    progress = Progress(bcfg.progress, len(jobs), bcfg.progress_every_s)
    try:
        if bcfg.workers <= 1 or len(jobs) <= 1:
            for index, path in jobs:
                build_piece(index, path, cfg, tok, settings_id, progress)
                progress(0, 1)
            return progress.tokens
        # fork: workers start at once and need no `if __name__ == "__main__"` guard in the caller.
        # `tokenizers` notices the fork and runs single-threaded in the children, which is what we
        # want: the processes are the parallelism.
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        with ctx.Pool(min(bcfg.workers, len(jobs)), _init_worker, (tok.to_str(), asdict(cfg), settings_id, q)) as pool:
            result = pool.map_async(_run_piece, jobs, chunksize=1)
            while not result.ready():
                try:
                    progress(*q.get(timeout=0.2))
                except queue.Empty:
                    pass
            result.get()  # re-raises a worker's DataError here
            while not q.empty():
                progress(*q.get())
        return progress.tokens
    finally:
        progress.close()


# -- the whole build ----------------------------------------------------------------------------
def prepare_tokenizer(cfg: DataConfig, files: list[str], out: Path, bcfg: BuildConfig) -> Tokenizer:
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    elif (out / "tokenizer.json").is_file() and (out / "build.json").is_file():
        tok = load_tokenizer(out / "tokenizer.json", root=out)  # a re-run reuses the tokenizer it trained
    elif bcfg.tasks > 1:
        raise DataError("data.tokenizer is null but build.tasks > 1: every task would train its own tokenizer; "
                        "train one first (python -m data_pipeline.tokenizer) and set data.tokenizer")
    else:
        tok = train_on_inputs(files, cfg, cfg.vocab_size)
    atomic_write(out / "tokenizer.json", tok.to_str())
    return tok


def record_settings(cfg: DataConfig, tok: Tokenizer, out: Path) -> str:
    """build.json: the settings the shards in `out` are built with; a re-run with others is refused."""
    settings = {"settings": {k: getattr(cfg, k) for k in BUILD_KEYS}, "tokenizer_fingerprint": fingerprint(tok),
                "layout": LAYOUT}
    path = out / "build.json"
    if path.is_file():
        before = read_json(out, "build.json")
        for key, value in before["settings"].items():
            if settings["settings"].get(key) != value:
                raise DataError(f"{out} holds a build with data.{key}={value!r}, this build has data.{key}="
                                f"{settings['settings'].get(key)!r}; point data.dir elsewhere or remove that directory")
        if before["tokenizer_fingerprint"] != settings["tokenizer_fingerprint"]:
            raise DataError(f"{out} holds a build with another tokenizer; point data.dir elsewhere")
    else:
        atomic_write(path, json.dumps(settings, indent=1))
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def build(cfg: DataConfig, bcfg: BuildConfig) -> Manifest | None:
    """Builds this task's share of cfg.inputs into cfg.dir; returns the manifest once merged. A file
    that cannot be written or read meanwhile (a full disk...) is one DataError naming it."""
    check_settings(cfg)
    files = resolve_inputs(cfg.inputs)  # every input error before any work
    try:
        return _build(cfg, bcfg, files)
    except OSError as e:
        out = Path(cfg.dir)
        where = next((p for p in (out, *out.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(where).free / 2**20
        what = f"{e.filename}: {e.strerror or e}" if e.filename else (e.strerror or str(e))
        raise DataError(f"the build of {out} stopped: {what} ({free:,.1f} MiB free there); run it again once that "
                        f"is fixed: it continues where it stopped") from None


def _build(cfg: DataConfig, bcfg: BuildConfig, files: list[str]) -> Manifest | None:
    out = Path(cfg.dir)
    (out / "pieces").mkdir(parents=True, exist_ok=True)
    tok = prepare_tokenizer(cfg, files, out, bcfg)
    settings_id = record_settings(cfg, tok, out)
    mine = [(i, f) for i, f in enumerate(files) if i % bcfg.tasks == bcfg.task]
    if plan_path(out).is_file():  # merged (or merging): every piece is done, its shards renamed
        todo = []
    else:
        todo = [(i, f) for i, f in mine if not piece_done(out, i, f, settings_id)]
    start = time.perf_counter()
    tokens = run_pieces(todo, cfg, tok, settings_id, bcfg)
    seconds = time.perf_counter() - start
    summary = {"dir": str(out), "inputs": len(mine), "built": len(todo), "skipped_done": len(mine) - len(todo),
               "tokens": tokens, "tokens_per_s": round(tokens / max(seconds, 1e-9))}
    manifest = None
    if bcfg.merge:
        manifest = merge(cfg, files, tok, settings_id, {k: getattr(cfg, k) for k in BUILD_KEYS})
        summary.update(windows={s: v["samples"] for s, v in manifest.totals.items()},
                       shards={s: v["shards"] for s, v in manifest.totals.items()}, documents=manifest.documents,
                       dropped_tokens=manifest.dropped_tokens, vocab_size=manifest.vocab_size)
    print(json.dumps(summary), file=sys.stderr)
    return manifest


DEMO_KEYS = ("inputs", "format", "tokenizer", "vocab_size", "seq_len", "heldout_fraction")


def check_built_with(manifest: Manifest, cfg: DataConfig) -> None:
    """The demo corpus built with other settings than the run asks for is an error, not a silent
    reuse. (Other shards are checked against the run by what they hold: seq_len, vocabulary and
    tokenizer, in pretrain.config.validate_data.)"""
    for key in DEMO_KEYS:
        built = manifest.build_config.get(key)
        if built != getattr(cfg, key):
            raise DataError(f"{cfg.dir} was built with data.{key}={built!r}, this run has data.{key}="
                            f"{getattr(cfg, key)!r}; point data.dir elsewhere or remove that directory")


DEMO_BUILD = BuildConfig(workers=1, task=0, tasks=1, merge=True, progress=False, progress_every_s=0)


def ensure_built(cfg: DataConfig, check_files: bool = True) -> Manifest:
    """The manifest of cfg.dir; the built-in demo corpus is built on first use (and rebuilt when it
    was built by an older shard format: it is a cache), anything else must have been built beforehand.
    With check_files, every shard listed is checked before anything is read (shards.check_shard_files):
    a regular file inside cfg.dir of the listed size, and for the demo corpus (small) of the listed
    sha256 too, so a shard swapped for another valid one is refused at start on both paths."""
    directory = Path(cfg.dir)
    manifest = None
    if cfg.inputs != ["demo"]:
        manifest = Manifest.load(directory)
    elif os.path.lexists(directory / "manifest.json"):
        if read_manifest(directory).get("format_version") == FORMAT_VERSION:  # one line if truncated or foreign
            manifest = Manifest.load(directory)
            check_built_with(manifest, cfg)
    if manifest is None:
        staging = Path(cfg.dir + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        build(DataConfig(**{**asdict(cfg), "dir": str(staging)}), DEMO_BUILD)
        if directory.exists():  # an older format: replaced whole
            shutil.rmtree(directory)
        staging.rename(directory)  # appears whole or not at all
        manifest = Manifest.load(directory)
    if check_files and cfg.url is None:  # a URL template reads shards from elsewhere: checked when streamed
        check_shard_files(directory, manifest, digests=cfg.inputs == ["demo"], on_corrupt=cfg.on_corrupt)
    return manifest


def main(argv: list[str]) -> None:
    from data_pipeline.cli import add_overrides, config_reference, parser

    p = parser("data_pipeline.build", __doc__, config_reference(("data", "files"), ("build", "default")))
    add_overrides(p)
    args = p.parse_args(argv)
    try:
        cfg = compose(args.overrides)
        build(data_config(cfg), build_config(cfg))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
