"""Train a LLaDA model: `python -m pretrain.train [Hydra overrides]`.

The same module runs alone (one process), under `deepspeed --num_gpus N --module pretrain.train`,
under `torchrun --nproc_per_node N -m pretrain.train`, and under SLURM's srun. Order of work: check
the config and the data (cheap, fails fast), then join the process group, build the engine, resume,
train, save, and optionally print a sample.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before the imports below take seconds: a launcher that dies meanwhile is noticed
    import signal

    from pretrain.launcher_watch import watch

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C before training ends the rank, without a traceback
    watch()

import dataclasses
import errno
import json
import os
import socket
import sys
from functools import partial
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from data_pipeline.build import ensure_built
from data_pipeline.config import check_command_line
from data_pipeline.shards import FORMAT_VERSION, DataError, Manifest, read_manifest
from data_pipeline.stream import TokenStream
from data_pipeline.tokenizer import load_tokenizer
from pretrain import heartbeat
from pretrain.checkpoint import choice, run_lock
from pretrain.checkpoint import store as checkpoint
from pretrain.checkpoint.files import CheckpointError, CheckpointWriteError
from pretrain.checkpoint.resume_check import (
    compare,
    config_dict,
    flatten,
    reapply_optimizer_settings,
    refusal,
    refuse_before_data,
)
from pretrain.checkpoint.universal import load_dir_for
from pretrain.checks import load_config, validate_data
from pretrain.config import ConfigError, RunConfig, total_steps
from pretrain.engine import expert_parallel, sequence_parallel
from pretrain.engine.build import build_engine, check_device, init_distributed, world_size_from_env
from pretrain.engine.device import bound_cpu_kernel_caches
from pretrain.engine.lr_schedule import decay_beyond_end, warmup_beyond_end
from pretrain.faults import (
    EXIT_CONFIG,
    EXIT_NON_FINITE,
    EXIT_PREEMPTED,
    StopRequest,
    exit_now,
    peer_lost,
    stop_agreed,
    timed_out,
    watch_launchers,
)
from pretrain.loop import NonFiniteError, Trainer
from pretrain.model.anneal import anneal_beyond_end
from pretrain.model.kv_cache import make_cache
from pretrain.model.transformer import count_params
from pretrain.monitor.metrics import MetricsLogger
from pretrain.objective.sampler import generate, generate_block_rows, left_pad


def strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N, which Hydra would reject; LOCAL_RANK is also in
    the environment, so the flag carries nothing we need."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            continue
        elif arg == "--local_rank":
            skip = True
        else:
            out.append(arg)
    return out


def prepare_data(run: RunConfig, rank: int) -> Manifest:
    """Rank 0 builds the demo corpus if it is missing and shares the outcome, so that a data error
    stops every rank instead of leaving the others waiting at a collective; then each rank checks."""
    outcome = [None]
    if rank == 0:
        try:
            ensure_built(run.data)
        except DataError as e:
            outcome = [str(e)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise DataError(outcome[0])
    manifest = ensure_built(run.data, check_files=False)  # rank 0 checked every shard file above
    validate_data(run, manifest)
    return manifest


def write_setup(run: RunConfig, engine, cfg: DictConfig, world: int) -> None:
    """config.yaml (resolved) and setup.json: what this run is, including how ZeRO-3 split the model."""
    local = sum(getattr(p, "ds_tensor", p).numel() for p in engine.module.parameters())
    per_rank = [0] * world
    dist.all_gather_object(per_rank, local)
    if dist.get_rank() == 0:
        Path(run.run_dir, "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        setup = {"world_size": world, **count_params(engine.module), "local_params_per_rank": per_rank,
                 "device": str(engine.device), "precision": run.trainer.precision,
                 "param_dtype": str(next(engine.module.parameters()).dtype),  # what it really trains in
                 "deepspeed_config": engine.config}
        Path(run.run_dir, "setup.json").write_text(json.dumps(setup, indent=1, default=str))


PATH_KEYS = ("run_dir", "data.dir", "data.tokenizer", "model.init_from")


class RanksDisagree(ConfigError):
    """Every rank finds the same difference: rank 0 alone prints it (two ranks' lines would interleave)."""


def agree_on_config(run: RunConfig) -> None:
    """One run, one directory: every rank must have resolved the same config (an override such as
    run_dir=out_${oc.env:RANK}, or a relative path from another working directory, would make each
    rank write its own run_dir and every checkpoint unusable). Compared before anything is written;
    the first difference is one line naming the key, rank 0's value and the other rank's."""
    mine = flatten(config_dict(run))
    for key in PATH_KEYS:
        if mine.get(key):
            mine[key] = os.path.abspath(mine[key])
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone[1:], start=1):
        for key in sorted(set(everyone[0]) | set(theirs)):
            if everyone[0].get(key) != theirs.get(key):
                raise RanksDisagree(f"{key} differs between ranks: {everyone[0].get(key)!r} on rank 0, "
                                  f"{theirs.get(key)!r} on rank {rank}; every rank of a run must resolve the same "
                                  f"config (a per-rank ${{oc.env:...}} or a relative path in another directory?)")


def lock_run_dir(run: RunConfig, rank: int) -> run_lock.RunLock | None:
    """Rank 0 takes run_dir's lock; every rank learns the outcome, so a refusal stops them all."""
    lock, outcome = None, [None]
    if rank == 0:
        try:
            lock = run_lock.acquire(run.run_dir, run.trainer.lock_stale_s)
        except run_lock.RunLockError as e:
            outcome = [str(e)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise run_lock.RunLockError(outcome[0])
    return lock


def check_resume(run: RunConfig, resume: checkpoint.Resume, manifest: Manifest) -> str | None:
    """Refuses a checkpoint of another model shape or other data (before the engine is built); returns why
    the shards must be recut at the same world size (another cluster.expert_parallel), or None."""
    line = sequence_parallel.resume_line(resume.manifest.get("config", {}), run)
    reshard = expert_parallel.reshard(resume.manifest.get("config", {}), run)  # to or from AutoEP: refused here
    if line and dist.get_rank() == 0:
        print(line, flush=True)
    refused, allowed = compare(resume.manifest.get("config", {}), config_dict(run),
                               resume.manifest.get("data_fingerprint"), manifest.fingerprint())
    if refused:
        raise ConfigError(refusal(resume.directory, refused))
    if allowed and dist.get_rank() == 0:
        print(f"resume: changed since {resume.tag}: {'; '.join(allowed)}", flush=True)
    return reshard


def print_sample(run: RunConfig, engine, manifest: Manifest) -> None:
    """sample.prompt (or each of a list, dealt out to the ranks: rank r samples r, r + world, ...), printed
    by rank 0 in order. Every rank calls the ZeRO-3 engine equally often: a rank with no prompt of its
    own samples the first one again, and with a threshold the ranks agree when every block is decoded."""
    s = run.sample
    tok = load_tokenizer(Path(run.data.dir) / "tokenizer.json", root=run.data.dir)
    prompts = [s.prompt] if isinstance(s.prompt, str) else list(s.prompt)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(prompts), world))
    encoded = [tok.encode(prompts[i]).ids for i in mine or [0]]
    ids, prompt_mask = left_pad(encoded, manifest.eos_id, engine.device)
    passes = {"made": 0, "needed": 0}

    def forward(x, **kwargs):
        passes["made"] += 1
        return engine(x, **kwargs)

    def in_step(active: bool) -> bool:  # MAX over the ranks: is any rank still decoding?
        flag = torch.tensor([int(active)], device=engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def joined_forward(x, **kwargs):  # a block model's rows: each pass announced, so that ranks done early
        in_step(True)  # keep making passes (below) as long as another rank makes real ones
        passes["needed"] += 1
        return forward(x, **kwargs)

    def all_done(done: bool) -> bool:  # MIN over the ranks: done only when every rank is
        passes["needed"] += 0 if done else 1
        flag = torch.tensor([int(done)], device=engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    engine.eval()
    if run.model.block_size:  # a block diffusion model: each row alone, so the ranks' passes differ in number
        out = generate_block_rows(joined_forward, ids, prompt_mask, s.gen_length, s.steps, manifest.mask_id,
                                  run.model.block_size, temperature=s.temperature, seed=run.seed,
                                  threshold=s.threshold, factor=s.factor,
                                  new_cache=partial(make_cache, s.cache, run.model.block_size))
        while in_step(False):  # another rank still decodes: make the passes it makes (ZeRO-3 gathers in each)
            forward(ids[:, :1], block_size=run.model.block_size)
    else:
        out = generate(forward, ids, s.gen_length, s.steps, manifest.mask_id, block_length=s.block_length,
                       temperature=s.temperature, seed=run.seed, threshold=s.threshold, factor=s.factor,
                       prompt_mask=prompt_mask, cache=make_cache(s.cache, None), all_done=all_done)
    completions = out[:, ids.shape[1]:].tolist()  # rows past `mine` only kept the ranks in step
    texts = [(i, tok.decode(enc + row)) for i, enc, row in zip(mine, encoded, completions, strict=False)]
    gathered = [None] * world
    dist.all_gather_object(gathered, (texts, passes))
    if rank == 0:
        for _, text in sorted(t for ranked, _ in gathered for t in ranked):
            print(f"sample: {text!r}", flush=True)  # repr: whitespace stays visible
        if s.threshold is not None or s.factor is not None:
            print("sample: passes per rank (needed by its own prompts/made): "
                  + ", ".join(f"{p['needed']}/{p['made']}" for _, p in gathered), flush=True)


def check_prebuilt_data(run: RunConfig) -> None:
    """Shards that already exist are checked against the run before any process group or engine. The
    demo corpus is a cache rebuilt when missing or of an older format: then it is checked once built."""
    path = Path(run.data.dir) / "manifest.json"
    if not path.is_file():
        if run.data.inputs != ["demo"]:  # only the demo corpus is built by training; the rest beforehand
            raise DataError(f"data.dir={run.data.dir} has no manifest.json: build the shards first, with python -m "
                            f"data_pipeline.build data=files data.inputs=[...] data.dir={run.data.dir}")
        return
    if run.data.inputs == ["demo"] and read_manifest(run.data.dir).get("format_version") != FORMAT_VERSION:
        return
    validate_data(run, Manifest.load(run.data.dir))


def train(cfg: DictConfig) -> None:
    # every config error before any work; model.init_from alone takes the architecture from its folder
    run = load_config(cfg, world_size_from_env(), list(HydraConfig.get().overrides.task))
    if run.cluster.device == "cpu":
        bound_cpu_kernel_caches()
    refuse_before_data(run)  # a resume that will be refused builds no data first
    check_prebuilt_data(run)
    if run.resume == "never" and checkpoint.latest(run.run_dir):
        raise ConfigError(f"run_dir={run.run_dir} already has checkpoints (latest: {checkpoint.latest(run.run_dir)});"
                          f" resume=auto continues that run, or choose another run_dir")
    last_step = total_steps(run.trainer)
    schedule = (run.optim.schedule.points, run.optim.schedule.unit, run.trainer.global_batch_size * run.trainer.seq_len,
                last_step)
    start_warnings = [w for w in (warmup_beyond_end(*schedule) or decay_beyond_end(*schedule),
                                  anneal_beyond_end(run.model.attention_anneal_steps, last_step)) if w]
    stop = StopRequest()
    watch_launchers(stop)  # also a launcher that died while this rank was importing
    rank, world = init_distributed(timeout_s=run.cluster.timeout_s,
                                   shm_comm=run.cluster.device != "cpu" or run.cluster.shm_comm)
    # From here on a SIGTERM/SIGUSR1 ends in a checkpoint, not a lost run. Before, while the rendezvous
    # may wait on a peer, it ends the rank at once: there is nothing to save yet.
    stop.install()
    heartbeat.start(rank, world, run.cluster.timeout_s)  # names a peer that stops answering (pretrain/heartbeat.py)
    for warning in start_warnings if rank == 0 else ():
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    check_device(run)
    agree_on_config(run)  # before any rank writes anything
    print(f"rank {rank}/{world} on host {socket.gethostname()}", flush=True)  # which node each rank ran on
    if stop_agreed(stop):  # stopped during start-up: no rank trains, none holds the lock or the port
        if rank == 0:
            print(f"stopping before training: {stop.reason}", flush=True)
        teardown()
        sys.exit(EXIT_PREEMPTED)
    manifest = prepare_data(run, rank)
    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run, rank)

    cfg.model.vocab_size = run.model.vocab_size  # config.yaml records the vocabulary taken from the data
    cfg.model.mask_token = run.model.mask_token  # and a warm start's mask token (pretrain/hf/causal_import.py)
    cfg.model.block_size = run.model.block_size  # and the block size it serves with (objective/block.py)
    # The checkpoint is chosen and verified, and its config compared, before the engine is built.
    resume = choice.find_resume(run.run_dir) if run.resume == "auto" else None
    engine_run = run
    if resume is not None:
        reshard = check_resume(run, resume, manifest)
        load_dir, ds_section = load_dir_for(resume, run.run_dir, run.deepspeed, reshard)
        engine_run = dataclasses.replace(run, deepspeed=ds_section)
    engine = build_engine(engine_run, world)
    write_setup(run, engine, cfg, world)
    saved = None
    if resume is not None:
        same_layout = sequence_parallel.saved_size(resume.manifest.get("config", {})) == run.cluster.sequence_parallel
        saved = checkpoint.load(engine, resume, load_dir, same_layout)
        reapply_optimizer_settings(engine, run.optim)
    # The ranks of a sequence-parallel group read the same sequences: the stream's ranks are the groups.
    layout = sequence_parallel.Layout.of(run, rank, world)
    stream_args = dict(micro_batch_size=run.trainer.micro_batch_size, rank=layout.dp_rank, world_size=layout.dp_size,
                       seed=run.seed,
                       shuffle_buffer=run.data.shuffle_buffer, num_workers=run.data.num_workers, url=run.data.url,
                       on_corrupt=run.data.on_corrupt, batches_per_item=run.data.batches_per_item,
                       doc_starts=run.model.document_mask)
    train_stream = TokenStream(run.data.dir, "train", **stream_args)
    eval_stream = TokenStream(run.data.dir, "heldout", **stream_args) if run.trainer.eval_every else None
    metrics = MetricsLogger(run.run_dir, run.logging, OmegaConf.to_container(cfg, resolve=True),
                            enabled=rank == 0, start_step=saved["step"] if saved else 0, device=run.cluster.device)
    trainer = Trainer(run, engine, train_stream, eval_stream, manifest.mask_id, metrics, stop)
    if saved is not None:
        trainer.load_trainer_state(saved)
        if rank == 0:
            print(f"resumed from {resume.directory} at step {trainer.state.step}", flush=True)
            if trainer.done():  # re-running a finished run is not an error, but say so
                t = run.trainer
                limit = (f"trainer.max_steps={t.max_steps}" if t.max_steps is not None
                         else f"trainer.max_tokens={t.max_tokens}")
                print(f"run_dir={run.run_dir} already finished at step {trainer.state.step} ({limit}): nothing to "
                      f"train; a larger {limit.split('=')[0]} trains on", flush=True)
    outcome = trainer.train()
    if outcome == "done" and run.sample.at_end:
        print_sample(run, engine, manifest)
    metrics.close()
    if lock is not None:
        lock.release()
    if outcome == "preempted":
        teardown()
        sys.exit(EXIT_PREEMPTED)


def teardown() -> None:
    """A clean end of the process group, so that no rank aborts in gloo's destructor at exit. Not
    between the jobs of a sweep, which share this process and its process group."""
    if dist.is_initialized() and HydraConfig.get().mode != RunMode.MULTIRUN:
        heartbeat.stop()
        dist.barrier()
        dist.destroy_process_group()


def remove_if_empty(run_dir: str) -> None:
    """Hydra creates run_dir before the config is checked; a run that never started leaves nothing.
    Every rank gets here with the same error, so no check-then-remove: another rank may have removed
    the directory between the two (seen as a traceback after the one-line error, 1 run in 25)."""
    try:
        Path(run_dir).rmdir()  # only an empty directory goes
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.ENOTDIR):
            raise


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
        teardown()
    except CheckpointWriteError as e:  # during training (a full disk): not a config error, not a requeue
        print(f"error: {e}", file=sys.stderr, flush=True)
        exit_now(1)
    except (ConfigError, DataError, CheckpointError, run_lock.RunLockError) as e:
        # Before the process group every rank of a node checks the same config and files: one line per
        # node is enough. After it, an error may be one rank's own (a shard it read): each says its own,
        # except the ranks' disagreement, which rank 0 alone reports.
        if dist.is_initialized() and (not isinstance(e, RanksDisagree) or dist.get_rank() == 0) \
                or not dist.is_initialized() and os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        remove_if_empty(str(cfg.run_dir))
        exit_now(EXIT_CONFIG)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        exit_now(EXIT_NON_FINITE)
    except Exception as e:
        if not peer_lost(e):
            raise
        if timed_out(e) and (line := heartbeat.stopped_peer_line(dist.get_rank())):
            print(f"error: {line}", file=sys.stderr, flush=True)
            exit_now(1)
        text = str(e).strip().splitlines()
        print(f"error: rank {dist.get_rank()}: another rank is gone ({type(e).__name__}: {text[0] if text else ''}); "
              f"its own error, if it had one, is on its line", file=sys.stderr, flush=True)
        exit_now(1)


if __name__ == "__main__":
    sys.argv = strip_local_rank(sys.argv)
    # Hydra reads the overrides itself: an unknown key or group option would be its several-line
    # message and exit 1, advising `+key=` (which would train without the intended setting).
    if problem := check_command_line(sys.argv[1:]):
        if os.environ.get("RANK", "0") == "0":  # every rank finds it; one line is enough
            print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    main()
