"""Typed configs for a run, and their composition from `conf/`.

Hydra composes `conf/` into a DictConfig; `parse_config` turns it into these dataclasses, which
rejects unknown keys and wrong types; pretrain/domains.py gives every numeric key its range, and
`check_values` checks the names and relations that neither can express. The checks that need a
domain's knowledge (model shapes, mask schedules, the DeepSpeed section, the sampler, init_from)
live with each domain and are run, in one place, by pretrain/checks.py. This module imports no
domain module, so every module can stand on it. The defaults live in `conf/` only: the dataclasses
say which keys exist, not what their values are. Every error is one line that names the key and
the value at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.config import BuildConfig, DataConfig
from pretrain.model.config import ModelConfig, MoEConfig  # noqa: F401  (the network's config lives beside it)


class ConfigError(ValueError):
    """A config value that cannot work; raised before any expensive step."""


@dataclass
class MaskConfig:
    schedule: str  # linear (LLaDA's) | cosine | polynomial | loglinear
    eps: float  # t is drawn from [eps, 1]: keeps the 1/t-like weights finite
    exponent: float  # of the polynomial schedule
    time_sampling: str  # iid (the paper) | stratified | antithetic, over the global batch
    normalize: str  # tokens (the paper: B * L) | masked (the number of masked tokens)
    random_length_prob: float  # share of batches cut to a random length (not in the conditional form)
    conditional: bool  # prompt/response data: prompt tokens never masked, loss per response token
    prompt_len: int | None  # the prompt length of samples that carry none (conditional form only)
    band: list[float] | None  # [low, high]: t drawn in [max(eps, low), high] (clipped noise); null: [eps, 1]
    complementary: bool  # each sequence also trained with the complement of its mask (pretrain/objective/noise.py)


@dataclass
class BlockScheduleConfig:
    unit: str  # steps | tokens | fraction, as optim.schedule
    points: list[Any]  # [[position, block size], ...]: the size of the last point at or before the step


@dataclass
class BlockConfig:
    """Block diffusion (pretrain/objective/block.py; docs/block_diffusion.md)."""
    size: int | None  # tokens per block; null: the whole sequence (LLaDA, no clean half)
    schedule: BlockScheduleConfig | None  # block size over the run (LLaDA 2.0's WSD); null: `size` throughout
    noise: str  # block: one t per block (BD3LM) | sequence: one t per sequence (dFactory)
    weight: str  # elbo: the schedule's ELBO weight (BD3LM) | none: every masked token weighs 1 (dFactory)
    embedding_noise: float  # std of Gaussian noise on masked tokens' embeddings in training (LLaDA 2.0 conversion)



@dataclass
class FaultConfig:
    """Fault injection for tests and drills; all empty in conf/fault/none.yaml."""
    nan_steps: list[int]  # steps whose loss is replaced by NaN (on the ranks below)
    nan_ranks: list[int] | None  # null: every rank
    sleep_at_step: int | None  # a rank sleeps (a hang in Python code) in this step...
    sleep_s: float  # ...for this long
    sleep_rank: int
    record_samples: bool  # each rank writes the windows of every step to run_dir/samples/ (drills)


@dataclass
class ScheduleConfig:
    unit: str
    points: list[Any]  # [[position, lr_fraction], ...]; checked in validate


@dataclass
class OptimConfig:
    lr: float
    betas: list[float]
    eps: float
    weight_decay: float
    grad_clip: float
    schedule: ScheduleConfig
    impl: str  # torch (AdamW, fused on CUDA) | deepspeed_fused (DeepSpeed's FusedAdam: a JIT build on first use)


@dataclass
class TrainerConfig:
    max_steps: int | None
    max_tokens: int | None
    seq_len: int
    micro_batch_size: int
    global_batch_size: int
    log_every: int
    eval_every: int
    eval_batches: int
    eval_mc_num: int  # mask draws per held-out sequence (pretrain/objective/likelihood.py)
    ckpt_every: int
    ckpt_every_minutes: float  # also save when this much time passed since the last save (0: never)
    keep_last: int  # retention: the newest N complete checkpoints (0: all) ...
    keep_every: int  # ... plus, permanently, those at a multiple of N steps (0: none)
    lock_stale_s: float  # a run_dir lock from another host with no heartbeat for this long is taken over
    precision: str
    max_bad_steps: int
    watchdog_s: float
    activation_checkpointing: str  # none | full | k (every k-th block)
    compile: bool  # regional torch.compile of the blocks


@dataclass
class SlurmConfig:
    """How `python -m launch.submit` lays a run out on a SLURM cluster (checked there, before sbatch)."""
    cpus_per_node: int  # nodes and ranks per node: cluster.nodes, cluster.gpus_per_node
    partition: str | None
    account: str | None
    time_limit: str  # SLURM's format: MM, HH:MM:SS, D-HH:MM, ...
    constraint: str | None
    preempt_signal_s: int  # USR1 this many seconds before the time limit: the ranks save and the job requeues
    requeue: bool
    launcher: str  # deepspeed | torchrun: one per node, started by srun
    job_name: str
    log_dir: str  # one log file per job: <log_dir>/<job_name>-<job id>.out
    python: str | None  # the interpreter on the compute nodes; null: the one that submits
    setup: list[str]  # shell lines run before the launch (module load ..., source venv/bin/activate)
    sbatch_extra: list[str]  # more sbatch options, e.g. ["--qos=high", "--exclusive"]
    env: dict[str, str]  # exported in the job (NCCL_*, WANDB_*, HYDRA_FULL_ERROR, ...)


@dataclass
class ClusterConfig:
    name: str
    device: str
    timeout_s: float  # process-group timeout: how long a collective waits for a dead or stopped peer
    sequence_parallel: int  # ranks that split each sequence (Ulysses, pretrain/engine/sequence_parallel.py)
    expert_parallel: int | None  # model.moe: null pure-torch experts; N: AutoEP on N ranks (engine/expert_parallel.py)
    shm_comm: bool  # CPU only: DeepSpeed's shared-memory all-reduce (a gcc build on first use) instead of gloo alone
    nodes: int  # the planner's layout (pretrain/plan.py); the launcher decides the real one
    gpus_per_node: int
    gpu_memory_gb: float | None  # per device; the planner warns above it
    peak_tflops: float | None  # dense bf16 per device; null: looked up from the device name (pretrain/model/flops.py)
    slurm: SlurmConfig | None  # the layout on a SLURM cluster (cluster=slurm, slurm_local); null elsewhere


@dataclass
class LoggingConfig:
    mode: str  # auto | offline | online | disabled
    project: str
    entity: str | None
    group: str | None
    tags: list[str]
    name: str | None
    t_buckets: int  # the loss is also logged per bucket of the masking time t: this many equal buckets of [0, 1]


@dataclass
class SampleConfig:
    at_end: bool
    prompt: Any  # a string, or a list of strings dealt out to the ranks (rank r samples r, r + world, ...)
    gen_length: int
    steps: int
    block_length: int | None  # semi-autoregressive blocks of this many tokens; null: one block of gen_length
    temperature: float
    threshold: float | None  # parallel decoding (pretrain/objective/sampler.py); null: the scheduled sampler
    factor: float | None  # Fast-dLLM's factor rule instead of a threshold; null: none
    cache: str | None  # prefix | dual | block (pretrain/model/kv_cache.py); null: none


@dataclass
class RunConfig:
    run_dir: str
    seed: int
    resume: str
    model: ModelConfig
    mask: MaskConfig
    block: BlockConfig
    data: DataConfig
    build: BuildConfig
    optim: OptimConfig
    deepspeed: Any  # passed through to DeepSpeed; checked by pretrain.engine.ds_config
    cluster: ClusterConfig
    logging: LoggingConfig
    sample: SampleConfig
    trainer: TrainerConfig
    fault: FaultConfig


def parse_config(cfg: DictConfig) -> RunConfig:
    """Hydra's composed config -> a RunConfig with the right keys and types (values not yet checked)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        run = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        # OmegaConf's message names the key ("Key 'foo' not in 'ModelConfig'"); keep its first line.
        raise ConfigError(f"config: {str(e).splitlines()[0]} (full key: {e.full_key})") from None
    run.deepspeed = OmegaConf.to_container(cfg.deepspeed, resolve=True)
    return run


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_optim(o: OptimConfig) -> None:
    """What pretrain/domains.py's table of single values cannot say: the schedule's shape."""
    require(o.schedule.unit in ("steps", "tokens", "fraction"),
            f"optim.schedule.unit={o.schedule.unit!r} is not one of steps, tokens, fraction")
    points = o.schedule.points
    require(len(points) > 0 and all(isinstance(p, list) and len(p) == 2 for p in points),
            f"optim.schedule.points={points} must be a non-empty list of [position, lr_fraction]")
    positions = [p[0] for p in points]
    require(positions == sorted(positions), f"optim.schedule.points={points} positions must not decrease")
    require(o.schedule.unit != "fraction" or all(0 <= x <= 1 for x in positions),
            f"optim.schedule.points={points}: with optim.schedule.unit=fraction positions are in [0, 1]")


def total_steps(t: TrainerConfig) -> int:
    """The step the run ends at: the first of max_steps and max_tokens."""
    by_tokens = -(-t.max_tokens // (t.global_batch_size * t.seq_len)) if t.max_tokens is not None else None
    return min(s for s in (t.max_steps, by_tokens) if s is not None)


def check_trainer(t: TrainerConfig, world_size: int) -> None:
    """The relations between trainer keys (each key's own range is in pretrain/domains.py's table)."""
    per_step = t.micro_batch_size * world_size
    require(t.global_batch_size % per_step == 0,
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
            f"trainer.micro_batch_size={t.micro_batch_size} x world size {world_size} = {per_step}")
    require(t.max_steps is not None or t.max_tokens is not None,
            "trainer.max_steps and trainer.max_tokens are both null: the run would never end")


def check_values(run: RunConfig, world_size: int) -> None:
    """The names and relations of the sections no domain owns (each numeric key's range: pretrain/domains.py)."""
    check_trainer(run.trainer, world_size)
    check_optim(run.optim)
    require(run.resume in ("auto", "never"), f"resume={run.resume!r} is not one of auto, never")
    require(run.data.on_corrupt in ("error", "skip"),
            f"data.on_corrupt={run.data.on_corrupt!r} is not one of error, skip")
    require(run.data.seq_len == run.trainer.seq_len,
            f"data.seq_len={run.data.seq_len} differs from trainer.seq_len={run.trainer.seq_len}")
    require(run.logging.mode in ("auto", "offline", "online", "disabled"),
            f"logging.mode={run.logging.mode!r} is not one of auto, offline, online, disabled")
