"""DeepSpeed setup: process group, engine config, the model built under ZeRO-3, the optimizer.

Choices are made once, here: `optim.impl` picks the optimizer (torch AdamW, fused on CUDA, which
needs no build; or DeepSpeed's FusedAdam), DeepSpeed's accelerator says whether this is CUDA or the
CPU, and trainer.* switch activation checkpointing and regional torch.compile on the model.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import warnings

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from pretrain.config import ConfigError, RunConfig, total_steps
from pretrain.engine import expert_parallel, sequence_parallel
from pretrain.engine.expert_balance import keep_bias_fp32
from pretrain.engine.lr_schedule import lr_fraction, step_to_position
from pretrain.hf.folder_files import FormatError, read_json
from pretrain.model.transformer import Block, LLaDAModel, compile_blocks

deepspeed.utils.logger.setLevel(logging.WARNING)  # the framework logs what matters; DeepSpeed's INFO floods
# DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, every step; the warning is not ours to fix.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adopt_slurm_ranks() -> None:
    """srun started the ranks itself (`srun python -m pretrain.train`, deepspeed's --launcher slurm):
    SLURM's task ids are the ranks; MASTER_ADDR/MASTER_PORT come exported from the batch script."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ["SLURM_LOCALID"])


def world_size_from_env() -> int:
    _adopt_slurm_ranks()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce with gcc when the process group
    starts (about 150 s on a fresh machine). gloo alone is correct and, for the models a CPU trains,
    fast enough, so the CPU path skips the build unless `cluster.shm_comm=true`. DeepSpeed reads the
    op through this module-level function, so replacing it is the one switch it offers. (Looked up
    in sys.modules: the attribute `deepspeed.comm.torch` is the torch package itself, re-exported.)"""
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _count_cpu_devices_once() -> None:
    """DeepSpeed's CPU accelerator counts its "devices" (NUMA nodes) by running `numactl --hardware`
    on every device_count() call, and ZeRO-3 calls it for every gradient bucket: a fork of the whole
    process per block per micro-batch (a CPU step 7% longer, bench/engine.py). The count cannot change,
    so the accelerator (one object, cached by DeepSpeed) answers from the first call. (Not through
    LOCAL_SIZE, which it reads first: DeepSpeed's shm all-reduce takes that as the ranks per node.)"""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        count = accelerator.device_count()
        accelerator.device_count = lambda: count


def init_distributed(timeout_s: float, shm_comm: bool = True) -> tuple[int, int]:
    """Join the process group the launcher set up (deepspeed, torchrun, srun), or make a one-process
    group on loopback when started as plain `python -m pretrain.train`. Returns (rank, world_size)."""
    _adopt_slurm_ranks()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not shm_comm:
        _skip_shm_comm_build()
    _count_cpu_devices_once()
    # The timeout bounds every collective: a peer that died or stopped fails this rank after timeout_s
    # instead of DeepSpeed's default 10 minutes.
    try:
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   timeout=datetime.timedelta(seconds=timeout_s))
    except torch.distributed.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        raise ConfigError(port_in_use(os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?"))) from None
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def port_in_use(addr: str, port: str | int) -> str:
    """The one line for a rendezvous port that another process holds (launch/run.py says the same)."""
    return (f"MASTER_PORT={port} on {addr} is in use (another job, or one still finishing, holds it): give the "
            f"launcher a free one (--master_port P), or leave it out with python -m launch.run, which picks a free "
            f"port on a single node")


def check_device(run: RunConfig) -> None:
    found = get_accelerator().device_name()
    if run.cluster.device != found:
        raise RuntimeError(f"cluster={run.cluster.name} expects device {run.cluster.device!r}, but DeepSpeed "
                           f"found {found!r}; pick a cluster= config for this machine")


PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def deepspeed_config(run: RunConfig, world_size: int) -> dict:
    t = run.trainer
    return {
        **run.deepspeed,
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
        "gradient_clipping": run.optim.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW
    }


def _torch_adamw(groups, run: RunConfig):
    # fused=True: one kernel for all tensors on CUDA; the CPU keeps the default (foreach) path.
    fused = get_accelerator().device_name() == "cuda"
    return torch.optim.AdamW(groups, lr=run.optim.lr, betas=tuple(run.optim.betas), eps=run.optim.eps, fused=fused)


def cuda_arch_list() -> str:
    """This GPU's compute capability as TORCH_CUDA_ARCH_LIST wants it ("9.0" on H100/H200). DeepSpeed's
    JIT build otherwise derives "sm_90a" on torch >= 2.11 and fails parsing it ('0a')."""
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _fused_adam(groups, run: RunConfig):
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_arch_list())  # a value the user set wins
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(groups, lr=run.optim.lr, betas=tuple(run.optim.betas), eps=run.optim.eps, adam_w_mode=True)


OPTIMIZERS = {"torch": _torch_adamw, "deepspeed_fused": _fused_adam}


def make_optimizer(model: torch.nn.Module, run: RunConfig) -> torch.optim.Optimizer:
    # Decay matrices only: decaying RMSNorm gains toward 0 would fight the normalization.
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": run.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS[run.optim.impl](groups, run)


def lr_scheduler(optimizer: torch.optim.Optimizer, run: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    tokens_per_step = run.trainer.global_batch_size * run.trainer.seq_len
    sched, last = run.optim.schedule, total_steps(run.trainer)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_fraction(sched.points, step_to_position(step, sched.unit, tokens_per_step, last)))


def report_init_from(model: torch.nn.Module, folder: str) -> None:
    """One line on rank 0: which weights the run starts from (a wrong folder shows at once)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    try:  # written by python -m pretrain.export; read inside the folder, size-capped
        info = read_json(folder, "export.json", 1 << 16, "written by python -m pretrain.export")
    except FormatError:
        info = {}
    known = isinstance(info.get("step"), int) and isinstance(info.get("source"), str)
    step = f"step {info['step']} of {info['source'][:200]}" if known else "step unknown"
    print(f"init_from: loaded {params:,} parameters from {folder} ({step})", flush=True)
    from pretrain.hf.causal_import import is_llada
    from pretrain.hf.format import context_changes, model_config_from_hf, read_config

    config = read_config(folder)
    if is_llada(config):  # a context extension (docs/long_context.md): the positions move, say so once
        changes = context_changes(model_config_from_hf(config, folder), model.cfg)
        if changes:
            print(f"init_from: context extension: {'; '.join(changes)}", flush=True)


def build_engine(run: RunConfig, world_size: int):
    """The model, built shard by shard under ZeRO-3 (an 8B model is never whole on one rank), wrapped
    in a DeepSpeed engine with its optimizer and lr schedule."""
    # cluster.sequence_parallel: DeepSpeed learns the groups from its parallel_state_sp module (the `mpu`):
    # ZeRO-3 still shards and reduces over the whole world, but averages over world / N, and its batch
    # math counts world / N data-parallel ranks, as ours does.
    mpu = sequence_parallel.init_groups(run.cluster.sequence_parallel)
    ds_config = deepspeed_config(run, sequence_parallel.data_parallel_size(run, world_size))
    ep = expert_parallel.size(run)
    if ep is not None:  # model.moe under DeepSpeed's AutoEP: it replaces the MoE blocks in initialize()
        ds_config["expert_parallel"] = expert_parallel.ds_section(run.model.moe, ep, run.cluster.device)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    torch.manual_seed(run.seed)  # the same initial weights on every rank and every run
    # No dtype argument: DeepSpeed 0.19 ignores it on the CPU accelerator (bf16 whatever was asked);
    # without one, zero.Init takes the dtype from the config's bf16 section, which follows precision.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage == 3, mpu=mpu):
        model = LLaDAModel(run.model)
    if run.model.init_from:  # continued pretraining or SFT from an exported folder
        from pretrain.hf.pretrained import copy_weights_into

        copy_weights_into(model, run.model.init_from)
        report_init_from(model, run.model.init_from)
    if stage != 3:
        model.to(PRECISIONS[run.trainer.precision])
    # A block is one ZeRO-3 unit: its weights are gathered together before its forward (and again
    # for a checkpointed block's recompute), so its forward sees plain tensors and can be compiled.
    deepspeed.utils.set_z3_leaf_modules(model, [Block])
    model.set_activation_checkpointing(run.trainer.activation_checkpointing)
    if run.trainer.compile:
        compile_blocks(model)
    if ep is not None:
        expert_parallel.lend_bias(model)
    optimizer = make_optimizer(model, run)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           lr_scheduler=lr_scheduler(optimizer, run), mpu=mpu)
    if ep is not None:
        expert_parallel.adopt(engine.module, run.model.moe)
    keep_bias_fp32(engine.module)  # model.moe: the expert bias stays fp32 whatever the weights' dtype
    return engine
