"""Typed configs for a run, and the checks that run before any work.

Hydra composes `conf/` into a DictConfig; `load_config` turns it into these dataclasses, which
rejects unknown keys and wrong types, then `validate` checks what types cannot express. The
defaults live in `conf/` only: the dataclasses say which keys exist, not what their values are.
Every error is one line that names the key and the value at fault.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.config import BuildConfig, DataConfig, compose
from pretrain.device import PRECISION_CHOICES, resolve_precision
from pretrain.diffusion import SCHEDULES, TIME_SAMPLING, MaskConfig
from pretrain.faults import FaultConfig
from pretrain.model import ModelConfig, checkpoint_stride
from pretrain.zero_sizes import resolve_zero_sizes

OPTIMIZER_IMPLS = ("torch", "deepspeed_fused")  # built by pretrain/engine.py's OPTIMIZERS


class ConfigError(ValueError):
    """A config value that cannot work; raised before any expensive step."""


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
    eval_mc_num: int  # mask draws per held-out sequence (pretrain/likelihood.py)
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
    shm_comm: bool  # CPU only: DeepSpeed's shared-memory all-reduce (a gcc build on first use) instead of gloo alone
    nodes: int  # the planner's layout (pretrain/plan.py); the launcher decides the real one
    gpus_per_node: int
    gpu_memory_gb: float | None  # per device; the planner warns above it
    peak_tflops: float | None  # dense bf16 per device; null: looked up from the device name (pretrain/flops.py)
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
    prompt: str
    gen_length: int
    steps: int
    temperature: float


@dataclass
class RunConfig:
    run_dir: str
    seed: int
    resume: str
    model: ModelConfig
    mask: MaskConfig
    data: DataConfig
    build: BuildConfig
    optim: OptimConfig
    deepspeed: Any  # passed through to DeepSpeed; checked by validate_deepspeed_section
    cluster: ClusterConfig
    logging: LoggingConfig
    sample: SampleConfig
    trainer: TrainerConfig
    fault: FaultConfig


def load_config(cfg: DictConfig, world_size: int = 1) -> RunConfig:
    """Hydra's composed config -> a validated RunConfig."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        run = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        # OmegaConf's message names the key ("Key 'foo' not in 'ModelConfig'"); keep its first line.
        raise ConfigError(f"config: {str(e).splitlines()[0]} (full key: {e.full_key})") from None
    run.deepspeed = resolve_zero_sizes(OmegaConf.to_container(cfg.deepspeed, resolve=True), run.model)
    validate(run, world_size)
    run.trainer.precision = resolve_precision(run.trainer.precision, run.cluster.device)
    return run


def compose_config(overrides: list[str], world_size: int = 1) -> RunConfig:
    """The validated config a `python -m pretrain.train OVERRIDES...` run would get (for tools and tests)."""
    return load_config(compose(overrides), world_size)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_model(m: ModelConfig) -> None:
    _require(m.d_model % m.n_heads == 0,
             f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}")
    _require(m.n_heads % m.n_kv_heads == 0,
             f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    _require(m.head_dim % 2 == 0, f"model head dim d_model/n_heads={m.head_dim} must be even for RoPE")
    _require(m.attention in ("auto", "sdpa", "flash"),
             f"model.attention={m.attention!r} is not one of auto, sdpa, flash")
    for key in ("n_layers", "d_model", "mlp_hidden_size", "max_sequence_length"):
        _require(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    _require(m.vocab_size is None or m.vocab_size > 0, f"model.vocab_size={m.vocab_size} must be positive (or null)")
    if m.init_from:
        check_init_from(m)


def check_init_from(m: ModelConfig) -> None:
    """model.init_from's config.json against model=: the first difference, before any work."""
    from pretrain.hf_format import FormatError
    from pretrain.pretrained import check_init_from as check

    try:
        check(m.init_from, m)
    except FormatError as e:
        raise ConfigError(f"model.init_from={m.init_from}: {e}") from None


def validate_optim(o: OptimConfig) -> None:
    finite = math.isfinite
    _require(finite(o.lr) and o.lr > 0, f"optim.lr={o.lr} must be a positive number")
    _require(len(o.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in o.betas),
             f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    _require(finite(o.eps) and o.eps > 0, f"optim.eps={o.eps} must be a positive number")
    _require(finite(o.weight_decay) and o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _require(finite(o.grad_clip) and o.grad_clip > 0, f"optim.grad_clip={o.grad_clip} must be a positive number")


def validate_mask(m: MaskConfig) -> None:
    _require(m.schedule in SCHEDULES, f"mask.schedule={m.schedule!r} is not one of {', '.join(SCHEDULES)}")
    _require(0 < m.eps < 1, f"mask.eps={m.eps} must be in (0, 1)")
    _require(m.schedule != "polynomial" or m.exponent > 0, f"mask.exponent={m.exponent} must be > 0")
    _require(m.time_sampling in TIME_SAMPLING,
             f"mask.time_sampling={m.time_sampling!r} is not one of {', '.join(TIME_SAMPLING)}")
    _require(m.normalize in ("tokens", "masked"), f"mask.normalize={m.normalize!r} is not one of tokens, masked")


def validate(run: RunConfig, world_size: int) -> None:
    validate_model(run.model)
    t = run.trainer
    _require(t.micro_batch_size > 0, f"trainer.micro_batch_size={t.micro_batch_size} must be positive")
    _require(t.eval_mc_num > 0, f"trainer.eval_mc_num={t.eval_mc_num} must be positive")
    per_step = t.micro_batch_size * world_size
    _require(t.global_batch_size % per_step == 0,
             f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
             f"trainer.micro_batch_size={t.micro_batch_size} x world size {world_size} = {per_step}")
    _require(0 < t.seq_len <= run.model.max_sequence_length,
             f"trainer.seq_len={t.seq_len} is outside 1..model.max_sequence_length="
             f"{run.model.max_sequence_length} (model={run.model.name})")
    _require(t.max_steps is not None or t.max_tokens is not None,
             "trainer.max_steps and trainer.max_tokens are both null: the run would never end")
    for key in ("max_steps", "max_tokens"):
        value = getattr(t, key)
        _require(value is None or value > 0, f"trainer.{key}={value} must be positive (or null)")
    for key in ("log_every", "eval_batches"):
        _require(getattr(t, key) > 0, f"trainer.{key}={getattr(t, key)} must be positive")
    for key in ("eval_every", "ckpt_every", "max_bad_steps", "watchdog_s"):
        _require(getattr(t, key) >= 0, f"trainer.{key}={getattr(t, key)} must be >= 0 (0 turns it off)")
    _require(run.cluster.timeout_s > 0, f"cluster.timeout_s={run.cluster.timeout_s} must be positive")
    validate_optim(run.optim)
    _require(t.precision in PRECISION_CHOICES,
             f"trainer.precision={t.precision!r} is not one of {', '.join(PRECISION_CHOICES)}")
    for key in ("ckpt_every_minutes", "keep_last", "keep_every"):
        _require(getattr(t, key) >= 0, f"trainer.{key}={getattr(t, key)} must be >= 0")
    _require(t.lock_stale_s > 0, f"trainer.lock_stale_s={t.lock_stale_s} must be positive")
    _require(run.resume in ("auto", "never"), f"resume={run.resume!r} is not one of auto, never")
    try:
        checkpoint_stride(t.activation_checkpointing)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(run.optim.impl in OPTIMIZER_IMPLS,
             f"optim.impl={run.optim.impl!r} is not one of {', '.join(OPTIMIZER_IMPLS)}")
    validate_mask(run.mask)
    if run.sample.at_end:  # a bad sampling setting would otherwise fail only after training
        from pretrain.generate import GenerateError, check_settings

        s = run.sample
        try:
            check_settings(s.gen_length, s.steps, None, "low_confidence", 0.0, s.temperature)
        except GenerateError as e:
            raise ConfigError(f"sample: {e}") from None
    _require(0 <= run.mask.random_length_prob <= 1,
             f"mask.random_length_prob={run.mask.random_length_prob} must be in [0, 1]")
    m = run.mask
    if m.prompt_len is not None:
        _require(m.conditional, f"mask.prompt_len={m.prompt_len} is set but mask.conditional=false")
        _require(0 <= m.prompt_len < t.seq_len, f"mask.prompt_len={m.prompt_len} must be in [0, trainer.seq_len="
                                                f"{t.seq_len}): a prompt that fills the sequence leaves no response")
    _require(not (m.conditional and m.random_length_prob > 0),
             f"mask.random_length_prob={m.random_length_prob} with mask.conditional=true would cut into prompts; "
             f"set it to 0")
    _require(run.data.on_corrupt in ("error", "skip"),
             f"data.on_corrupt={run.data.on_corrupt!r} is not one of error, skip")
    _require(run.data.num_workers >= 0, f"data.num_workers={run.data.num_workers} must be >= 0")
    _require(run.data.seq_len == t.seq_len,
             f"data.seq_len={run.data.seq_len} differs from trainer.seq_len={t.seq_len}")
    _require(run.optim.schedule.unit in ("steps", "tokens"),
             f"optim.schedule.unit={run.optim.schedule.unit!r} is not one of steps, tokens")
    points = run.optim.schedule.points
    _require(len(points) > 0 and all(isinstance(p, list) and len(p) == 2 for p in points),
             f"optim.schedule.points={points} must be a non-empty list of [position, lr_fraction]")
    positions = [p[0] for p in points]
    _require(positions == sorted(positions), f"optim.schedule.points={points} positions must not decrease")
    _require(run.logging.mode in ("auto", "offline", "online", "disabled"),
             f"logging.mode={run.logging.mode!r} is not one of auto, offline, online, disabled")
    _require(run.logging.t_buckets >= 1, f"logging.t_buckets={run.logging.t_buckets} must be >= 1")
    _require(run.cluster.peak_tflops is None or run.cluster.peak_tflops > 0,
             f"cluster.peak_tflops={run.cluster.peak_tflops} must be positive (or null: looked up by device name)")
    validate_deepspeed_section(run.deepspeed)


def resolve_vocab(run: RunConfig, manifest=None) -> None:
    """model.vocab_size=null takes the shards' vocabulary (padded to a multiple of 128 by the build):
    the manifest's when the shards exist, else what a build of data= would produce."""
    if run.model.vocab_size is not None:
        return
    if manifest is None and (Path(run.data.dir) / "manifest.json").is_file():
        from data_pipeline.shards import Manifest

        manifest = Manifest.load(run.data.dir)
    if manifest is not None:
        run.model.vocab_size = manifest.vocab_size
        return
    from data_pipeline.piece import pad_vocab

    if run.data.tokenizer:
        from data_pipeline.tokenizer import load_tokenizer

        run.model.vocab_size = pad_vocab(load_tokenizer(run.data.tokenizer).get_vocab_size())
    else:
        run.model.vocab_size = pad_vocab(run.data.vocab_size)


def validate_data(run: RunConfig, manifest) -> None:
    """The shards in data.dir must fit this run's model and sequence length."""
    resolve_vocab(run, manifest)
    where = f"{run.data.dir}/manifest.json"
    _require(manifest.seq_len == run.trainer.seq_len,
             f"{where}: seq_len={manifest.seq_len} but trainer.seq_len={run.trainer.seq_len}; rebuild the "
             f"shards or point data.dir elsewhere")
    _require(manifest.vocab_size <= run.model.vocab_size,
             f"{where}: vocab_size={manifest.vocab_size} exceeds model.vocab_size={run.model.vocab_size} "
             f"(model={run.model.name})")
    if run.data.tokenizer:
        from data_pipeline.tokenizer import fingerprint, load_tokenizer

        _require(fingerprint(load_tokenizer(run.data.tokenizer)) == manifest.tokenizer_fingerprint,
                 f"{where}: the shards were tokenized with another tokenizer than data.tokenizer={run.data.tokenizer}")
    if run.model.init_from:
        from pretrain.hf_format import read_config

        hf = read_config(run.model.init_from)
        _require(hf.get("mask_token_id") == manifest.mask_id,
                 f"model.init_from={run.model.init_from}: mask_token_id={hf.get('mask_token_id')}, but {where} has "
                 f"mask_id={manifest.mask_id} (another tokenizer)")
        _require(hf.get("vocab_size") == run.model.vocab_size,
                 f"model.init_from={run.model.init_from}: vocab_size={hf.get('vocab_size')}, but model.vocab_size="
                 f"{run.model.vocab_size}")
    m = run.mask
    if m.conditional:
        _require(manifest.format == "sft" or m.prompt_len is not None,
                 f"{where}: format={manifest.format} shards carry no prompt lengths; mask.conditional=true needs "
                 f"shards built with data.format=sft, or mask.prompt_len")
        _require(manifest.max_prompt_len < run.trainer.seq_len,
                 f"{where}: max_prompt_len={manifest.max_prompt_len} is not below trainer.seq_len="
                 f"{run.trainer.seq_len}")


# Top-level keys DeepSpeed 0.19 reads from its config (deepspeed/runtime/config.py). DeepSpeed
# silently ignores any other key, so a typo such as "zero_optimisation" would quietly train
# without ZeRO; we refuse it instead.
DEEPSPEED_KEYS = frozenset("""
    zero_optimization optimizer scheduler fp16 bf16 torch_autocast amp gradient_clipping
    prescale_gradients gradient_predivide_factor gradient_allreduce_op communication_data_type
    seq_parallel_communication_data_type zero_allow_untested_optimizer zero_force_ds_cpu_optimizer
    activation_checkpointing aio steps_per_print wall_clock_breakdown memory_breakdown dump_state
    flops_profiler tensorboard wandb csv_monitor comet comms_logger elasticity checkpoint data_types
    dataloader_drop_last data_efficiency curriculum_learning sparse_attention pipeline
    compression_training autotuning nebula timers weight_quantization hybrid_engine disable_allgather
    sparse_gradients eigenvalue progressive_layer_drop quantize_training
    use_data_before_expert_parallelism graph_harvesting compile tensor_parallel disable_python_gc
    use_node_local_storage
""".split())

# Keys the framework derives from trainer.* and optim.*, so there is one place to set each.
DERIVED_DEEPSPEED_KEYS = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_size",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision",
}


def validate_deepspeed_section(section: dict) -> None:
    _require(isinstance(section, dict), f"deepspeed: expected a mapping, got {type(section).__name__}")
    for key in section:
        if key in DERIVED_DEEPSPEED_KEYS:
            raise ConfigError(f"deepspeed.{key} is set from {DERIVED_DEEPSPEED_KEYS[key]}; remove it from the "
                              f"deepspeed section")
        _require(key in DEEPSPEED_KEYS, f"deepspeed.{key}: unknown DeepSpeed config key (DeepSpeed would "
                                        f"ignore it silently)")
    zero = section.get("zero_optimization")
    if zero is not None:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError

        try:
            DeepSpeedZeroConfig(**zero)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"deepspeed.zero_optimization.{where}={err.get('input')!r}: {err['msg']}") from None
