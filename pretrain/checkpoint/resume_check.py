"""May this run continue that checkpoint? The checkpoint's manifest records the resolved config and
the data's fingerprint; a resume whose model shape or data differs is refused with the list of
differences, before the engine is built. Everything else - lr and its schedule, logging, eval and
checkpoint cadence, max_steps / max_tokens, retention, batch sizes, worker counts, the mask
schedule - may change between runs, and the changes are printed in one line.
"""

from __future__ import annotations

# Keys that must match: the parameter shapes (the weights would not fit) and what fixes the data
# order (the stream's resume state would not fit). model.attention (the kernel) and model.init_std
# (used only before step 0) may change.
MUST_MATCH = ("model.n_layers", "model.d_model", "model.n_heads", "model.n_kv_heads", "model.mlp_hidden_size",
              "model.vocab_size", "model.max_sequence_length", "model.rope_theta", "model.rms_norm_eps",
              "trainer.seq_len", "seed", "data.shuffle_buffer",
              # the warm-start keys (issue 22): a checkpoint saved before they existed is LLaDA's, their default
              "model.head_dim", "model.qkv_bias", "model.qk_norm", "model.tie_embeddings", "model.rope_scaling",
              "model.shift_prediction",
              # the mixture of experts (issue 28): its shapes and routing (bias_update_rate, aux_loss_coef and
              # z_loss_coef may change); a checkpoint saved before these keys existed is dense, full RoPE
              "model.partial_rotary_factor", "model.moe.num_experts", "model.moe.top_k", "model.moe.expert_hidden_size",
              "model.moe.num_shared_experts", "model.moe.first_dense_layers", "model.moe.score_func",
              "model.moe.expert_bias", "model.moe.n_group", "model.moe.topk_group", "model.moe.routed_scaling_factor",
              "model.moe.norm_topk_prob")
# What a context-extension stage changes: not a resume (the data stream's state is for other windows and the
# lr schedule for another run) but a new run from an export with model.init_from (docs/long_context.md).
CONTEXT_KEYS = ("trainer.seq_len", "model.max_sequence_length", "model.rope_theta", "model.rope_scaling")
# Where the run is and what it logs; not worth a line.
IGNORED_PREFIXES = ("run_dir", "logging.", "resume", "sample.", "deepspeed.checkpoint")


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def compare(saved: dict, current: dict, saved_data: str | None, current_data: str) -> tuple[list[str], list[str]]:
    """(refusing differences, allowed changes), each as 'key: old -> new'."""
    old, new = flatten(saved), flatten(current)
    must = [k for k in MUST_MATCH if k in old]
    must += sorted(k for k in set(old) | set(new) if k.startswith("model.rope_scaling."))  # a dict, flattened
    refused = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in must if old.get(k) != new.get(k)]
    if saved_data is not None and saved_data != current_data:
        refused.append(f"data fingerprint: {saved_data} -> {current_data} (other shards in data.dir)")
    allowed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if k not in must and k not in MUST_MATCH and old.get(k) != new.get(k)
               and not k.startswith(IGNORED_PREFIXES)]
    return refused, allowed


def refusal(where, refused: list[str]) -> str:
    """The one line a refused resume raises; where only the context keys changed, it names the way that works."""
    way = "use another run_dir, or resume=never with a fresh one"
    keys = [r.split(":")[0] for r in refused]  # a new length also means new shards: their fingerprint differs
    if any(k.startswith(CONTEXT_KEYS) for k in keys) and all(k.startswith(CONTEXT_KEYS) or k == "data fingerprint"
                                                             for k in keys):
        way = ("to train at a longer context, export this run (python -m pretrain.export) and start a new run_dir "
               "with model.init_from (docs/long_context.md)")
    return f"{where} was trained with another model or data; refusing to resume ({'; '.join(refused)}): {way}"


def refuse_before_data(run) -> None:
    """resume=auto: the model shape, trainer.seq_len, seed and shuffle of the newest checkpoint that
    passes the resume's checks (hashes aside: choice.verify) are compared with this run's before any
    data is prepared, so a run that will be refused builds nothing first (a seq_len change means
    another demo corpus). Keys not known yet (model.vocab_size=null, taken from the data) are left to
    the full check after the data is ready."""
    from pretrain.checkpoint.choice import candidates, verify
    from pretrain.checkpoint.store import ckpt_dir
    from pretrain.config import ConfigError

    if run.resume != "auto":
        return
    current = flatten(config_dict(run))
    root = ckpt_dir(run.run_dir)
    for tag in candidates(root):
        problem, manifest = verify(root / tag, lambda names: [])  # the resume's verdict, without the hashing
        if problem is not None:
            continue  # the resume reports it and tries the next older one
        saved = flatten(manifest["config"])
        refused = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in MUST_MATCH
                   if current.get(k) is not None and saved.get(k) != current.get(k)]
        if refused:
            raise ConfigError(refusal(root / tag, refused))
        return


def config_dict(run) -> dict:
    """A RunConfig as the JSON the manifest holds (so that a saved and a current config compare equal)."""
    import json
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(run), default=str))


def reapply_optimizer_settings(engine, optim) -> None:
    """DeepSpeed's load restores the optimizer's hyperparameters and the lr scheduler's base lr from
    the checkpoint, so a changed optim.lr (or betas, eps, weight decay) would be silently ignored on a
    resume. The current config's values are put back; the schedule's position is the checkpoint's.
    Groups are [decayed, not decayed], as pretrain/engine/build.py makes them."""
    sched, groups = engine.lr_scheduler, engine.optimizer.param_groups
    sched.base_lrs = [optim.lr for _ in groups]
    lrs = [base * fraction(sched.last_epoch) for base, fraction in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
    for group, decay, lr in zip(groups, (optim.weight_decay, 0.0), lrs, strict=True):
        group.update(lr=lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=decay)
    sched._last_lr = lrs
