"""The mixture-of-experts feed-forward (model.moe): a router, routed SwiGLU experts, shared experts.

LLaDA 2.0's (inclusionAI's modeling_llada2_moe.py, DeepSeek V3's routing): scores = sigmoid (or
softmax) of the router's logits, in fp32 whatever the compute dtype; the experts are chosen on
scores + expert_bias (the bias steers the choice only, never the weights), optionally within the
`topk_group` best of `n_group` groups (a group's score: the sum of its two best experts); the chosen
experts' scores are normalised to sum to one (`norm_topk_prob`) and multiplied by
`routed_scaling_factor`. Every token reaches all its top_k experts (dropless: no capacity, no token
dropped). The shared experts are one SwiGLU of num_shared_experts x expert_hidden_size that every
token passes. Parameter names: moe.router.weight [E, d], buffer moe.router.expert_bias [E] (fp32,
saved with the model), moe.experts.{gate_proj,up_proj} [E, F, d] and moe.experts.down_proj [E, d, F]
(dFactory's merged layout), moe.shared.{gate_proj,up_proj,down_proj}.weight.

Balance: the expert bias moves by `bias_update_rate` x sign(mean load - load) after each optimizer
step, from the tokens per expert counted over the step on all ranks (`update_expert_bias`, called by
the training loop outside autograd); the optional load-balancing loss (Switch Transformer's
E x sum_i f_i P_i) and router z-loss (ST-MoE's mean logsumexp^2) are kept by each router for the
loop to add to the loss (`router_loss`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.model.config import ModelConfig, MoEConfig


def normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.normal_(t, mean=0.0, std=std)


class SwiGLU(nn.Module):
    def __init__(self, d: int, width: int, std: float, out_std: float):
        super().__init__()
        self.gate_proj = nn.Linear(d, width, bias=False)
        self.up_proj = nn.Linear(d, width, bias=False)
        self.down_proj = nn.Linear(width, d, bias=False)
        for lin, s in ((self.gate_proj, std), (self.up_proj, std), (self.down_proj, out_std)):
            normal_(lin.weight, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, d: int, m: MoEConfig, std: float):
        super().__init__()
        self.cfg = m
        self.weight = nn.Parameter(normal_(torch.empty(m.num_experts, d), std))
        self.register_buffer("expert_bias", torch.zeros(m.num_experts, dtype=torch.float32))
        self.load = torch.zeros(m.num_experts)  # tokens per expert since the last optimizer step (this rank)
        self.loss: torch.Tensor | None = None  # the auxiliary and z-losses of the last forward (with grad)

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The top_k experts per token on `scores` [T, E], within the topk_group best groups."""
        m = self.cfg
        if m.n_group > 1:
            T = scores.shape[0]
            grouped = scores.view(T, m.n_group, -1)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(m.topk_group, dim=-1).indices, True)
            scores = scores.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        return scores.topk(m.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> expert ids [T, k], fp32 weights [T, k]."""
        m = self.cfg
        logits = F.linear(x.float(), self.weight.float())  # routing in fp32
        scores = torch.sigmoid(logits) if m.score_func == "sigmoid" else logits.softmax(-1)
        with torch.no_grad():
            idx = self.choose(scores + self.expert_bias.float() if m.expert_bias else scores)
        weights = scores.gather(1, idx)
        if m.norm_topk_prob and m.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * m.routed_scaling_factor
        counts = torch.bincount(idx.flatten(), minlength=m.num_experts)
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:  # not a checkpointed recompute
            self.load = self.load.to(counts.device) + counts.float()
        self.loss = balance_loss(m, logits, scores, counts) if torch.is_grad_enabled() else None
        return idx, weights


def balance_loss(m: MoEConfig, logits, scores, counts) -> torch.Tensor | None:
    """The auxiliary and z-losses of one router's forward (fp32 logits and scores [T, E], counts [E])."""
    loss = None
    if m.aux_loss_coef > 0:  # E x sum_i f_i P_i: f the share of choices, P the mean normalised score
        f = counts.float() * m.num_experts / (logits.shape[0] * m.top_k)
        p = (scores / scores.sum(-1, keepdim=True)).mean(0)
        loss = m.aux_loss_coef * (f * p).sum()
    if m.z_loss_coef > 0:
        z = m.z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        loss = z if loss is None else loss + z
    return loss


class Experts(nn.Module):
    """The routed experts' weights stacked, one SwiGLU per row; computed one expert at a time on its
    tokens (a sort, a loop, a weighted scatter-add: the reference, exact and dropless)."""

    def __init__(self, d: int, m: MoEConfig, std: float, out_std: float):
        super().__init__()
        E, F_ = m.num_experts, m.expert_hidden_size
        self.gate_proj = nn.Parameter(normal_(torch.empty(E, F_, d), std))
        self.up_proj = nn.Parameter(normal_(torch.empty(E, F_, d), std))
        self.down_proj = nn.Parameter(normal_(torch.empty(E, d, F_), out_std))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T, k = idx.shape
        order = idx.flatten().argsort(stable=True)
        token = order // k
        counts = torch.bincount(idx.flatten(), minlength=self.gate_proj.shape[0]).tolist()
        outs = []
        # Every expert runs, an empty one on zero rows: each weight stays in the graph (a zero gradient,
        # not a missing one, for ZeRO-3's reduce hooks).
        for e, rows in enumerate(x[token].split(counts)):
            h = F.silu(rows @ self.gate_proj[e].t()) * (rows @ self.up_proj[e].t())
            outs.append(h @ self.down_proj[e].t())
        y = torch.cat(outs).float() * weights.flatten()[order, None]
        return torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, y).to(x.dtype)


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, std: float, out_std: float):
        super().__init__()
        m, d = cfg.moe, cfg.d_model
        self.router = Router(d, m, std)
        self.experts = Experts(d, m, std, out_std)
        self.shared = SwiGLU(d, m.num_shared_experts * m.expert_hidden_size, std, out_std) \
            if m.num_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weights = self.router(flat)
        y = self.experts(flat, idx, weights)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(shape)


def routers(model: nn.Module) -> list[Router]:
    """The model's routers, in layer order; under expert parallelism AutoEP's, as the engine left them
    (pretrain/engine/expert_parallel.py's EPRouter: the same cfg, expert_bias, load and loss)."""
    ep = getattr(model, "ep_routers", None)
    return ep if ep is not None else [m for m in model.modules() if isinstance(m, Router)]


def router_loss(model: nn.Module) -> torch.Tensor | float:
    """The routers' auxiliary and z-losses of the last forward, summed (0.0 when none is on)."""
    losses = [r.loss for r in routers(model) if r.loss is not None]
    return torch.stack(losses).sum() if losses else 0.0


@torch.no_grad()
def update_expert_bias(rs: list[Router], load: torch.Tensor) -> None:
    """load [layers, E]: tokens per expert over the step on all ranks. The auxiliary-loss-free update
    (DeepSeek V3): an expert above the mean load gets its bias lowered by the rate, one below raised."""
    for r, n in zip(rs, load, strict=True):
        if r.cfg.expert_bias and r.cfg.bias_update_rate > 0:
            delta = r.cfg.bias_update_rate * torch.sign(n.mean() - n)
            r.expert_bias.copy_((r.expert_bias.float() + delta.to(r.expert_bias.device)).to(r.expert_bias.dtype))


def take_load(rs: list[Router], device) -> torch.Tensor:
    """This rank's tokens per expert since the last call [layers, E], and the counters zeroed."""
    load = torch.stack([r.load.to(device).float() for r in rs])
    for r in rs:
        r.load = torch.zeros_like(r.load)
    return load


def check_moe(cfg: ModelConfig) -> None:
    """model.moe.* and the shapes it needs, one line naming the key (run by transformer.check_config)."""
    from pretrain.config import require

    require(0 < cfg.partial_rotary_factor <= 1 and cfg.rotary_dim % 2 == 0,
            f"model.partial_rotary_factor={cfg.partial_rotary_factor} must be in (0, 1] and turn an even number of "
            f"dims of head dim {cfg.head_size}")
    m = cfg.moe
    if m is None:
        return
    require(m.num_experts > 0 and m.expert_hidden_size > 0 and m.num_shared_experts >= 0,
            f"model.moe: num_experts={m.num_experts} and expert_hidden_size={m.expert_hidden_size} must be positive, "
            f"num_shared_experts={m.num_shared_experts} >= 0")
    require(0 <= m.first_dense_layers <= cfg.n_layers,
            f"model.moe.first_dense_layers={m.first_dense_layers} is outside 0..model.n_layers={cfg.n_layers}")
    require(m.score_func in ("sigmoid", "softmax"), f"model.moe.score_func={m.score_func!r} is not sigmoid or softmax")
    require(m.n_group >= 1 and m.num_experts % m.n_group == 0,
            f"model.moe.n_group={m.n_group} does not divide model.moe.num_experts={m.num_experts}")
    require(1 <= m.topk_group <= m.n_group,
            f"model.moe.topk_group={m.topk_group} is outside 1..model.moe.n_group={m.n_group}")
    reachable = m.topk_group * m.num_experts // m.n_group
    require(1 <= m.top_k <= reachable, f"model.moe.top_k={m.top_k} is outside 1..{reachable} (the experts in "
            f"topk_group={m.topk_group} of n_group={m.n_group} groups)")
    for key in ("bias_update_rate", "aux_loss_coef", "z_loss_coef", "routed_scaling_factor"):
        require(getattr(m, key) >= 0, f"model.moe.{key}={getattr(m, key)} must be >= 0")
    require(not (m.bias_update_rate > 0 and not m.expert_bias),
            f"model.moe.bias_update_rate={m.bias_update_rate} needs model.moe.expert_bias=true")
