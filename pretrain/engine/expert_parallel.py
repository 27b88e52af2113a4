"""Expert parallelism for model.moe through DeepSpeed's AutoEP: `cluster.expert_parallel: N`.

null (the default): the pure-torch mixture of experts (pretrain/model/moe.py), the reference: each MoE
block is one ZeRO-3 unit and every rank runs every expert on its own tokens. N >= 1: DeepSpeed 0.19.8's
AutoEP replaces each MoE block (`transformer.blocks.{i}.moe`) with its AutoEPMoELayer when the engine is
built: the experts are cut into N groups of num_experts / N, each rank holds one group (sharded by ZeRO-3
over the ranks holding the same group) and tokens travel to their experts and back by all-to-all. N = 1
keeps every expert on every rank (AutoEP's own router and grouped experts, no all-to-all).

The block's routing is ours, expressed in AutoEP's config (`ds_section`): the score function, top_k,
group-limited choice, normalised weights, routed scaling, the weights applied after the experts, the
shared expert. What AutoEP lacks is put back on its layers after the build (`adopt`):
- routing in fp32: AutoEP's gate runs in the compute dtype; its Linear is swapped for one that computes
  the logits in fp32 (as our Router does) and keeps them for the losses below;
- the expert bias: AutoEP adds a router's `e_score_correction_bias` buffer to the scores it chooses on,
  exactly where ours adds `expert_bias`. Our routers lend theirs under that name before the build (AutoEP
  copies it onto its router), and the loop's update moves AutoEP's copy: the same all-reduced tokens per
  expert, the same sign rule, on every rank;
- the tokens per expert, the auxiliary loss and the z-loss: a forward hook on AutoEP's router counts the
  rank's tokens per expert before they are sent anywhere (what our Router counts) and computes the same
  losses from the kept fp32 logits. So every model.moe option runs under EP as without it.
AutoEP with ZeRO-3 does not combine with sequence parallelism: model.moe with cluster.sequence_parallel
> 1 is refused. A run's checkpoints hold AutoEP's layout (names and per-rank experts); docs/moe.md says
how they export and resume.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ConfigError, RunConfig, require
from pretrain.model.config import MoEConfig
from pretrain.model.moe import balance_loss

MOE_LAYERS = r"transformer\.blocks\.\d+\.moe"  # pretrain/model/transformer.py's Block.moe


def size(run: RunConfig) -> int | None:
    return run.cluster.expert_parallel


def check_config(run: RunConfig, world_size: int) -> None:
    section = run.deepspeed if isinstance(run.deepspeed, dict) else {}  # its expert_parallel: ds_config.py refuses
    sp = getattr(run.cluster, "sequence_parallel", 1) or 1
    if run.model.moe is not None and sp > 1:
        raise ConfigError(f"cluster.sequence_parallel={sp} with model.moe: DeepSpeed's expert parallelism (AutoEP) "
                          f"under ZeRO-3 does not combine with sequence parallelism; use cluster.sequence_parallel=1")
    n = size(run)
    if n is None:
        return
    key = f"cluster.expert_parallel={n}"  # an integer >= 1 (pretrain/domains.py)
    m = run.model.moe
    require(m is not None, f"{key}: expert parallelism needs a mixture of experts (model.moe); this model is "
                           f"dense (set cluster.expert_parallel=null)")
    require(m.num_experts % n == 0, f"{key} does not divide model.moe.num_experts={m.num_experts}")
    require(world_size % n == 0, f"{key} does not divide the world size {world_size}")
    stage = section.get("zero_optimization", {}).get("stage", 0)
    require(stage == 3, f"{key}: AutoEP is wired for ZeRO-3 here (deepspeed.zero_optimization.stage={stage})")
    require(m.n_group == 1 or m.num_experts // m.n_group >= 2,
            f"{key}: AutoEP scores a group by its two best experts, model.moe.n_group={m.n_group} leaves one "
            f"expert per group")


def saved_size(saved_config: dict) -> int | None:
    """The cluster.expert_parallel a checkpoint was trained with (null before the key existed)."""
    return (saved_config.get("cluster") or {}).get("expert_parallel")


def reshard(saved_config: dict, run: RunConfig) -> str | None:
    """Why a resume must recut the experts through DeepSpeed's universal checkpoint (another EP size),
    or None. A switch between the pure-torch experts and AutoEP is refused: their layers are saved under
    other names and layouts, and that is a new run from the export (model.init_from)."""
    old, new = saved_size(saved_config), size(run)
    if old == new:
        return None
    if old is None or new is None:
        raise ConfigError(f"cluster.expert_parallel: {old} -> {new}: the pure-torch experts and AutoEP's layers "
                          f"are checkpointed under other names; export the run (python -m pretrain.export) and "
                          f"start a new one from it with model.init_from (docs/moe.md)")
    return f"was written at cluster.expert_parallel={old}, this run has {new} (the experts move between ranks)"


def ds_section(m: MoEConfig, n: int, device: str) -> dict:
    """AutoEP's `expert_parallel` section for our MoE block."""
    section = {
        "enabled": True, "autoep_size": n,
        "moe_layer_pattern": MOE_LAYERS, "router_pattern": "router", "expert_pattern": "experts",
        "expert_w1": "gate_proj", "expert_w3": "up_proj", "expert_w2": "down_proj",  # [E, F, d], [E, F, d], [E, d, F]
        "has_shared_experts": m.num_shared_experts > 0, "shared_experts_pattern": "shared",
        "score_func": m.score_func, "top_k": m.top_k, "score_apply": "post",
        "route_norm": m.norm_topk_prob and m.top_k > 1,  # ours leaves a single expert's weight as scored
        "routed_scaling_factor": m.routed_scaling_factor,
        # torch._grouped_mm on the GPU; AutoEP's sequential loop over the local experts on the CPU
        "use_grouped_mm": device == "cuda",
    }
    if m.n_group > 1:
        section.update(num_expert_groups=m.n_group, num_limited_groups=m.topk_group)
    return section


def lend_bias(model: nn.Module) -> None:
    """Before the build: each Router's expert bias also under AutoEP's name, so AutoEP copies it (a bias
    loaded by model.init_from carries over)."""
    from pretrain.model.moe import Router

    for r in model.modules():
        if isinstance(r, Router):
            r.register_buffer("e_score_correction_bias", r.expert_bias)


class Fp32Gate(nn.Linear):
    """AutoEP's gate with the logits in fp32 (routing in fp32, model.moe), kept for the losses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        self.logits = F.linear(x.float(), self.weight.float(), bias)
        return self.logits


class EPRouter:
    """What the loop needs of a router (pretrain/model/moe.py's Router: cfg, expert_bias, load, loss),
    for AutoEP's router."""

    def __init__(self, router: nn.Module, cfg: MoEConfig):
        self.router, self.cfg = router, cfg
        self.load = torch.zeros(cfg.num_experts)
        self.loss: torch.Tensor | None = None
        router.gate.__class__ = Fp32Gate
        router.register_forward_hook(self.after_forward)

    @property
    def expert_bias(self) -> torch.Tensor:
        return self.router.e_score_correction_bias

    def after_forward(self, router, inputs, outputs) -> None:
        counts = outputs[2]
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:  # not a checkpointed recompute
            self.load = self.load.to(counts.device) + counts.float()
        self.loss = None
        if torch.is_grad_enabled() and (self.cfg.aux_loss_coef > 0 or self.cfg.z_loss_coef > 0):
            logits = router.gate.logits
            scores = torch.sigmoid(logits) if self.cfg.score_func == "sigmoid" else logits.softmax(-1)
            self.loss = balance_loss(self.cfg, logits, scores, counts)
        router.gate.logits = None


def adopt(model: nn.Module, m: MoEConfig) -> None:
    """After the build: AutoEP's layers get fp32 routing, our bias, counts and losses (see the top)."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    layers = [mod for mod in model.modules() if isinstance(mod, AutoEPMoELayer)]
    if not layers:
        raise RuntimeError("cluster.expert_parallel: AutoEP replaced no MoE layer (pattern "
                           f"{MOE_LAYERS!r} matched nothing)")
    model.ep_routers = [EPRouter(layer.router, m) for layer in layers]
