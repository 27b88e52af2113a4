"""The domain of every numeric config key, in one table, checked before any work.

A value outside its domain (a head count of 0, a negative lr point, a NaN, a RoPE theta of 0) would
end in a traceback deep in the model or train to NaN and exit 0. `check_domains` walks the table
and refuses the first value outside its domain in one line naming the key and the value. The
relations between keys (divisibility, seq_len within max_sequence_length, ...) stay with each
domain's own checks (pretrain/checks.py runs them after this table).

A new numeric key gets its domain by one line in DOMAINS: `"section.key": POSITIVE` (or another of
the kinds below; `nullable(...)` when null is allowed; `key[*]` for each item of a list).
tests/pretrain/test_domains.py fails for a numeric field of the typed configs that has no entry.
The same table checks a model folder's config.json (`check_section(model, "model")`), so every
command that opens a model refuses the same values training refuses.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from pretrain.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Domain:
    text: str  # what the value must be, as the error says it: "must be positive"
    ok: Callable[[Any], bool]
    null: bool = False  # None is allowed

    def problem(self, key: str, value: Any) -> str | None:
        if value is None:
            return None if self.null else f"{key}=null {self.text}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_list(value):
            return f"{key}={value!r} {self.text}"
        try:
            good = self.ok(value)
        except (TypeError, ValueError):
            good = False
        return None if good else f"{key}={_show(value)} {self.text}{' (or null)' if self.null else ''}"


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple))


def _show(value) -> str:
    return str(list(value)) if _is_list(value) else str(value)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def nullable(d: Domain) -> Domain:
    return Domain(d.text, d.ok, null=True)


POSITIVE = Domain("must be positive", lambda v: _number(v) and v > 0)
POSITIVE_NUMBER = Domain("must be a positive number", lambda v: _number(v) and v > 0)
POSITIVE_INT = Domain("must be positive", lambda v: _integer(v) and v > 0)
AT_LEAST_1 = Domain("must be at least 1", lambda v: _integer(v) and v >= 1)
NON_NEGATIVE = Domain("must be >= 0", lambda v: _number(v) and v >= 0)
NON_NEGATIVE_INT = Domain("must be an integer >= 0", lambda v: _integer(v) and v >= 0)
OFF_AT_0 = Domain("must be >= 0 (0 turns it off)", lambda v: _number(v) and v >= 0)
UNIT = Domain("must be in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
OPEN_UNIT = Domain("must be in (0, 1)", lambda v: _number(v) and 0 < v < 1)
HALF_OPEN_UNIT = Domain("must be in [0, 1)", lambda v: _number(v) and 0 <= v < 1)
FINITE_NON_NEGATIVE = Domain("must be a finite number >= 0", lambda v: _number(v) and v >= 0)
BETAS = Domain("must be two numbers in [0, 1)", lambda v: len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v))

DOMAINS: dict[str, Domain] = {
    "seed": NON_NEGATIVE_INT,
    # model: sizes, and the constants the forward divides by or takes the power of
    "model.n_layers": POSITIVE_INT,
    "model.d_model": POSITIVE_INT,
    "model.n_heads": POSITIVE_INT,
    "model.n_kv_heads": POSITIVE_INT,
    "model.mlp_hidden_size": POSITIVE_INT,
    "model.vocab_size": nullable(POSITIVE_INT),
    "model.max_sequence_length": POSITIVE_INT,
    "model.rope_theta": POSITIVE_NUMBER,
    "model.rms_norm_eps": POSITIVE_NUMBER,
    "model.init_std": POSITIVE_NUMBER,
    "model.head_dim": nullable(POSITIVE_INT),
    "model.attention_anneal_steps": NON_NEGATIVE_INT,
    "model.block_size": nullable(POSITIVE_INT),  # filled at start from block= (the last step's size)
    "model.partial_rotary_factor": Domain("must be in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
    # model.moe (null: dense); the relations between them are pretrain/model/moe.py's check_moe
    "model.moe.num_experts": POSITIVE_INT,
    "model.moe.top_k": POSITIVE_INT,
    "model.moe.expert_hidden_size": POSITIVE_INT,
    "model.moe.num_shared_experts": NON_NEGATIVE_INT,
    "model.moe.first_dense_layers": NON_NEGATIVE_INT,
    "model.moe.bias_update_rate": NON_NEGATIVE,
    "model.moe.n_group": POSITIVE_INT,
    "model.moe.topk_group": POSITIVE_INT,
    "model.moe.routed_scaling_factor": POSITIVE_NUMBER,
    "model.moe.aux_loss_coef": NON_NEGATIVE,
    "model.moe.z_loss_coef": NON_NEGATIVE,
    # mask
    "mask.eps": OPEN_UNIT,
    "mask.exponent": Domain("must be > 0", lambda v: _number(v) and v > 0),
    "mask.random_length_prob": UNIT,
    "mask.prompt_len": nullable(NON_NEGATIVE_INT),
    "mask.band[*]": UNIT,  # [low, high]; low < high is block.py's check
    # block diffusion
    "block.size": nullable(POSITIVE_INT),  # divides seq_len: block.py's check
    "block.embedding_noise": NON_NEGATIVE,
    # optim
    "optim.lr": POSITIVE_NUMBER,
    "optim.betas": BETAS,
    "optim.eps": POSITIVE_NUMBER,
    "optim.weight_decay": Domain("must be >= 0", lambda v: _number(v) and v >= 0),
    "optim.grad_clip": POSITIVE_NUMBER,
    "optim.schedule.points[*][0]": FINITE_NON_NEGATIVE,  # a position (steps, tokens or a fraction)
    "optim.schedule.points[*][1]": FINITE_NON_NEGATIVE,  # the lr as a fraction of optim.lr
    # trainer
    "trainer.max_steps": nullable(POSITIVE_INT),
    "trainer.max_tokens": nullable(POSITIVE_INT),
    "trainer.seq_len": POSITIVE_INT,
    "trainer.micro_batch_size": POSITIVE_INT,
    "trainer.global_batch_size": POSITIVE_INT,
    "trainer.log_every": POSITIVE_INT,
    "trainer.eval_every": OFF_AT_0,
    "trainer.eval_batches": POSITIVE_INT,
    "trainer.eval_mc_num": POSITIVE_INT,
    "trainer.ckpt_every": OFF_AT_0,
    "trainer.ckpt_every_minutes": NON_NEGATIVE,
    "trainer.keep_last": NON_NEGATIVE_INT,
    "trainer.keep_every": NON_NEGATIVE_INT,
    "trainer.lock_stale_s": POSITIVE,
    "trainer.max_bad_steps": OFF_AT_0,
    "trainer.watchdog_s": OFF_AT_0,
    # data and build (data_pipeline's sections, as a run reads them)
    "data.vocab_size": POSITIVE_INT,
    "data.seq_len": POSITIVE_INT,
    "data.shard_bytes": POSITIVE_INT,
    "data.member_bytes": POSITIVE_INT,
    "data.heldout_fraction": HALF_OPEN_UNIT,
    "data.shuffle_buffer": NON_NEGATIVE_INT,
    "data.num_workers": NON_NEGATIVE_INT,
    "data.batches_per_item": POSITIVE_INT,
    "build.workers": POSITIVE_INT,
    "build.task": NON_NEGATIVE_INT,
    "build.tasks": POSITIVE_INT,
    "build.progress_every_s": POSITIVE,
    # cluster
    "cluster.timeout_s": POSITIVE,
    "cluster.nodes": AT_LEAST_1,
    "cluster.sequence_parallel": AT_LEAST_1,
    "cluster.expert_parallel": nullable(AT_LEAST_1),  # divides num_experts and the world: expert_parallel.py
    "cluster.gpus_per_node": AT_LEAST_1,
    "cluster.gpu_memory_gb": nullable(POSITIVE),
    "cluster.peak_tflops": nullable(Domain("must be positive (or null: looked up by device name)",
                                           lambda v: _number(v) and v > 0)),
    "cluster.slurm.cpus_per_node": POSITIVE_INT,
    "cluster.slurm.preempt_signal_s": NON_NEGATIVE_INT,
    # logging, sampling at the end, fault drills
    "logging.t_buckets": Domain("must be >= 1", lambda v: _integer(v) and v >= 1),
    "sample.gen_length": POSITIVE_INT,
    "sample.steps": POSITIVE_INT,
    "sample.block_length": nullable(POSITIVE_INT),
    "sample.temperature": NON_NEGATIVE,
    "sample.threshold": nullable(Domain("must be in (0, 1] (or null: the scheduled sampler)",
                                        lambda v: _number(v) and 0 < v <= 1)),
    "sample.factor": nullable(POSITIVE),
    "fault.nan_steps[*]": POSITIVE_INT,
    "fault.nan_ranks[*]": NON_NEGATIVE_INT,
    "fault.sleep_at_step": nullable(POSITIVE_INT),
    "fault.sleep_s": NON_NEGATIVE,
    "fault.sleep_rank": NON_NEGATIVE_INT,
}

_PART = re.compile(r"\[\*\]|\[\d+\]|[^.\[\]]+")


def values_at(obj: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(concrete key, value) for each value a table key names; `[*]` runs over a list. A part that is not
    there (a section set to null, a list item that is not a list) yields nothing: structure checks name it."""
    def walk(node, parts, name):
        if not parts:
            yield name, node
            return
        part, rest = parts[0], parts[1:]
        if part == "[*]" or part.startswith("["):
            if not _is_list(node):
                return
            indices = range(len(node)) if part == "[*]" else [int(part[1:-1])]
            for i in indices:
                if i < len(node):
                    yield from walk(node[i], rest, f"{name}[{i}]")
            return
        if node is None:
            return
        child = node.get(part, _MISSING) if isinstance(node, dict) else getattr(node, part, _MISSING)
        if child is _MISSING:
            return
        yield from walk(child, rest, f"{name}.{part}" if name else part)

    yield from walk(obj, _PART.findall(key), "")


_MISSING = object()


def check_domains(run: RunConfig) -> None:
    """The first value of the run outside its domain, as a one-line ConfigError."""
    check_section(run, "")


def check_section(obj: Any, prefix: str) -> None:
    """The table's keys under `prefix` (e.g. "model") checked on `obj` (that section's dataclass)."""
    for key, domain in DOMAINS.items():
        if prefix and not key.startswith(prefix + "."):
            continue
        relative = key[len(prefix) + 1:] if prefix else key
        for name, value in values_at(obj, relative):
            full = f"{prefix}.{name}" if prefix else name
            if problem := domain.problem(full, value):
                raise ConfigError(problem)


def numeric_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every numeric field of the typed configs, as the table names it (lists of numbers as key[*])."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None))
        target = next(a for a in typing.get_args(hint) if a is not type(None)) if union else hint
        if is_dataclass(target):
            out += numeric_keys(target, key + ".")
        elif target in (int, float):
            out.append(key)
        elif typing.get_origin(target) is list and typing.get_args(target)[:1] in ((int,), (float,)):
            out.append(key + "[*]")
    return out
