"""The `deepspeed:` config section and the engine's keys, checked before any work.

DeepSpeed silently ignores a key it does not know, so a typo would quietly change the run; this
module refuses it. `check_config` is the engine's start-up check (run by pretrain/checks.py).
"""

from __future__ import annotations

from pretrain.config import ConfigError, RunConfig, require
from pretrain.engine.device import PRECISION_CHOICES

OPTIMIZER_IMPLS = ("torch", "deepspeed_fused")  # built by pretrain/engine/build.py's OPTIMIZERS


def check_config(run: RunConfig) -> None:
    require(run.trainer.precision in PRECISION_CHOICES,
            f"trainer.precision={run.trainer.precision!r} is not one of {', '.join(PRECISION_CHOICES)}")
    require(run.optim.impl in OPTIMIZER_IMPLS,
            f"optim.impl={run.optim.impl!r} is not one of {', '.join(OPTIMIZER_IMPLS)}")
    check_section(run.deepspeed)


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
    use_node_local_storage expert_parallel
""".split())

# Keys the framework derives from trainer.* and optim.*, so there is one place to set each.
DERIVED_DEEPSPEED_KEYS = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_size",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision",
    "expert_parallel": "cluster.expert_parallel",
}


def check_section(section: dict) -> None:
    require(isinstance(section, dict), f"deepspeed: expected a mapping, got {type(section).__name__}")
    for key in section:
        if key in DERIVED_DEEPSPEED_KEYS:
            raise ConfigError(f"deepspeed.{key} is set from {DERIVED_DEEPSPEED_KEYS[key]}; remove it from the "
                              f"deepspeed section")
        require(key in DEEPSPEED_KEYS, f"deepspeed.{key}: unknown DeepSpeed config key (DeepSpeed would "
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
