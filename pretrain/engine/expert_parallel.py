"""Expert parallelism for model.moe: not wired yet, refused in one line before any work.

The mixture of experts trains under ZeRO-3 as any other weight: each MoE block is one ZeRO-3 unit
(gathered whole for its forward), every rank runs every expert on its own tokens. DeepSpeed 0.19.8's
AutoEP (the `expert_parallel` section) would place the experts on ranks and exchange tokens by
all-to-all instead; it replaces the MoE block with its own router and experts (HF-style presets:
Mixtral, Qwen3-MoE, DeepSeek V2/V3), so our expert bias update, auxiliary and z-losses would not run
under it as they stand. Until it is adapted and proved equal to the pure-torch reference, asking for
it is an error, not a silent fallback. AutoEP with ZeRO-3 does not combine with sequence parallelism,
so a mixture of experts with cluster.sequence_parallel > 1 is refused as well.
"""

from __future__ import annotations

from pretrain.config import ConfigError, RunConfig


def check_config(run: RunConfig) -> None:
    section = run.deepspeed if isinstance(run.deepspeed, dict) else {}
    ep = section.get("expert_parallel")
    if ep is not None:
        size = ep.get("autoep_size", 1) if isinstance(ep, dict) else ep
        raise ConfigError(f"deepspeed.expert_parallel (autoep_size={size}): expert parallelism is not supported yet; "
                          f"the mixture of experts trains under ZeRO-3 without it (remove the section, docs/moe.md)")
    sp = getattr(run.cluster, "sequence_parallel", 1) or 1
    if run.model.moe is not None and sp > 1:
        raise ConfigError(f"cluster.sequence_parallel={sp} with model.moe: DeepSpeed's expert parallelism (AutoEP) "
                          f"under ZeRO-3 does not combine with sequence parallelism; use cluster.sequence_parallel=1")
