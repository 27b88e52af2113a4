"""The forward (masking) process of masked diffusion and its training loss. Pure torch.

LLaDA (arXiv 2502.09992, Eq. 3): per sequence, t ~ U(0, 1) and p_mask = (1 - eps) t + eps; each token
is replaced by the mask id independently with probability p_mask. The loss is the cross-entropy on
the masked positions, each weighted by 1 / p_mask, summed and divided by B * L (every token of the
batch, masked or not): an unbiased estimate of the negative ELBO per token.

Other schedules (the `mask=` config group) replace p_mask by 1 - alpha(t) and the weight by
-alpha'(t) / (1 - alpha(t)), with t drawn from [eps, 1]; for the linear schedule, alpha = 1 - t, this
is exactly LLaDA's objective. How t is drawn across the global batch is `mask.time_sampling`.

The conditional form (the paper's SFT, Eq. 5; `mask.conditional=true`) trains p(response | prompt):
the first prompt_len tokens of a sequence are never masked, and each sequence's loss is divided by
its response length L - prompt_len (EOS padding after a short response counts as response, as in the
paper), then averaged over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.config import MaskConfig, require


# -- schedules: alpha(t) is the probability that a token is kept at time t --------------------------
class Schedule:
    """alpha(1) = 0 (all masked); the ELBO weight of a masked token at time t is -alpha'(t) / (1 - alpha(t))."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return -self.alpha_prime(t) / (1 - self.alpha(t))

    def time_of(self, p: torch.Tensor) -> torch.Tensor:
        """The time whose masking probability is p (the inverse of mask_probability)."""
        raise NotImplementedError


class Linear(Schedule):
    """LLaDA: alpha = 1 - t, so p_mask = t and the weight is 1 / t = 1 / p_mask."""

    def alpha(self, t):
        return 1 - t

    def alpha_prime(self, t):
        return -torch.ones_like(t)

    def time_of(self, p):
        return p


class Cosine(Schedule):
    """alpha = cos(pi t / 2): masks fewer tokens early, more late."""

    def alpha(self, t):
        return torch.cos(math.pi / 2 * t)

    def alpha_prime(self, t):
        return -math.pi / 2 * torch.sin(math.pi / 2 * t)

    def time_of(self, p):
        return 2 / math.pi * torch.arccos(1 - p)


class Polynomial(Schedule):
    """alpha = 1 - t^k; the weight is k / t."""

    def __init__(self, exponent: float):
        self.k = exponent

    def alpha(self, t):
        return 1 - t**self.k

    def alpha_prime(self, t):
        return -self.k * t ** (self.k - 1)

    def time_of(self, p):
        return p ** (1 / self.k)


class LogLinear(Schedule):
    """MDLM's log-linear noise, sigma(t) = -log(1 - (1 - eps) t), so alpha = 1 - (1 - eps) t: the
    linear schedule with masking capped at 1 - eps (kept for comparisons with MDLM runs)."""

    def __init__(self, eps: float):
        self.eps = eps

    def alpha(self, t):
        return 1 - (1 - self.eps) * t

    def alpha_prime(self, t):
        return -(1 - self.eps) * torch.ones_like(t)

    def time_of(self, p):
        return (p / (1 - self.eps)).clamp_max(1.0)


SCHEDULES = {"linear": lambda cfg: Linear(), "cosine": lambda cfg: Cosine(),
             "polynomial": lambda cfg: Polynomial(cfg.exponent), "loglinear": lambda cfg: LogLinear(cfg.eps)}


def make_schedule(cfg: MaskConfig) -> Schedule:
    return SCHEDULES[cfg.schedule](cfg)


# -- time sampling over the global batch ----------------------------------------------------------
TIME_SAMPLING = ("iid", "stratified", "antithetic")


def check_config(m: MaskConfig, seq_len: int) -> None:
    """mask.*, before any work."""
    require(m.schedule in SCHEDULES, f"mask.schedule={m.schedule!r} is not one of {', '.join(SCHEDULES)}")
    require(0 < m.eps < 1, f"mask.eps={m.eps} must be in (0, 1)")
    require(m.schedule != "polynomial" or m.exponent > 0, f"mask.exponent={m.exponent} must be > 0")
    require(m.time_sampling in TIME_SAMPLING,
            f"mask.time_sampling={m.time_sampling!r} is not one of {', '.join(TIME_SAMPLING)}")
    require(m.normalize in ("tokens", "masked"), f"mask.normalize={m.normalize!r} is not one of tokens, masked")
    require(0 <= m.random_length_prob <= 1, f"mask.random_length_prob={m.random_length_prob} must be in [0, 1]")
    if m.prompt_len is not None:
        require(m.conditional, f"mask.prompt_len={m.prompt_len} is set but mask.conditional=false")
        require(0 <= m.prompt_len < seq_len, f"mask.prompt_len={m.prompt_len} must be in [0, trainer.seq_len="
                                             f"{seq_len}): a prompt that fills the sequence leaves no response")
    if m.band is not None:
        require(len(m.band) == 2 and 0 <= m.band[0] < m.band[1] <= 1,
                f"mask.band={list(m.band)} must be [low, high] with 0 <= low < high <= 1 (or null)")
        require(m.band[1] > m.eps, f"mask.band={list(m.band)}: high must exceed mask.eps={m.eps}")
    require(not (m.conditional and m.random_length_prob > 0),
            f"mask.random_length_prob={m.random_length_prob} with mask.conditional=true would cut into prompts; "
            f"set it to 0")


def sample_times(method: str, n_global: int, first: int, n: int, eps: float, generator: torch.Generator,
                 high: float = 1.0):
    """t in [eps, high] (mask.band clips both ends) for sequences first..first+n-1 of a global batch of
    n_global. `generator` must be seeded identically on every rank (from the step): each rank draws the
    global batch's times and keeps its own slice, so stratification holds across data-parallel ranks.
      iid:        independent u ~ U(0, 1)
      stratified: one offset u0, then u_i = (u0 + i / n_global) mod 1 (evenly spaced)
      antithetic: pairs (u, 1 - u) for sequences 2j and 2j + 1
    """
    if method == "iid":
        u = torch.rand(n_global, generator=generator)
    elif method == "stratified":
        u = (torch.rand(1, generator=generator) + torch.arange(n_global) / n_global) % 1.0
    elif method == "antithetic":
        half = torch.rand((n_global + 1) // 2, generator=generator)
        u = torch.stack([half, 1 - half], dim=1).flatten()[:n_global]
    else:
        raise ValueError(f"mask.time_sampling={method!r} is not one of iid, stratified, antithetic")
    return eps + (high - eps) * u[first: first + n]


# -- the forward process and the loss ---------------------------------------------------------------
@dataclass
class NoisyBatch:
    input_ids: torch.Tensor  # [B, L] x0 with masked positions replaced by the mask id
    masked: torch.Tensor  # [B, L] bool
    p_mask: torch.Tensor  # [B, 1] the masking probability of each sequence ([B, L]: per token, block diffusion)
    weight: torch.Tensor  # [B, 1] the ELBO weight of a masked token of each sequence ([B, L]: per token)
    response_len: torch.Tensor | None = None  # [B, 1] tokens after the prompt (conditional form only)
    t: torch.Tensor | None = None  # [B] the masking time of each sequence (for metrics by noise level)


def forward_process(x0: torch.Tensor, mask_id: int, t: torch.Tensor, schedule: Schedule,
                    generator: torch.Generator | None = None, prompt_len: torch.Tensor | None = None,
                    uniforms: torch.Tensor | None = None, elbo_weight: bool = True) -> NoisyBatch:
    """Masks each token of sequence b independently with probability 1 - alpha(t_b); with
    `prompt_len` [B], positions before prompt_len[b] are never masked (the conditional form).
    `t` [B] (one time per sequence) or [B, n_blocks] (block diffusion: one per block of L / n_blocks
    tokens). The draws are `uniforms` [B, L] (objective/draws.py: keyed by sequence) or, without
    them, torch.rand from `generator`. `elbo_weight=False`: every masked token weighs 1 (dFactory)."""
    B, L = x0.shape
    t = t.to(torch.float64)  # the weights of small t need the precision
    p_mask, weight = schedule.mask_probability(t), schedule.weight(t)
    if not elbo_weight:
        weight = torch.ones_like(weight)
    if t.dim() == 1:
        p_mask, weight = p_mask[:, None], weight[:, None]
    else:  # per block -> per token
        p_mask, weight = (v.repeat_interleave(L // t.shape[1], dim=1) for v in (p_mask, weight))
    if uniforms is None:
        uniforms = torch.rand(B, L, generator=generator, device=generator.device)
    masked = uniforms.to(x0.device) < p_mask.to(x0.device)
    response_len = None
    if prompt_len is not None:
        prompt_len = prompt_len.to(x0.device)[:, None]
        masked &= torch.arange(L, device=x0.device)[None, :] >= prompt_len
        response_len = (L - prompt_len).float()
    seq_t = t if t.dim() == 1 else t.mean(dim=1)
    return NoisyBatch(torch.where(masked, mask_id, x0), masked, p_mask.float().to(x0.device),
                      weight.float().to(x0.device), response_len, seq_t.float().to(x0.device))


@dataclass
class SequenceStats:
    """Per sequence of a micro-batch, detached: what the metrics need to show the loss by noise level."""
    t: torch.Tensor  # [B] masking time
    masked: torch.Tensor  # [B] number of masked tokens
    ce_sum: torch.Tensor  # [B] plain cross-entropy summed over the masked tokens
    weighted_sum: torch.Tensor  # [B] the sequence's share of the loss before normalization (weight x CE)
    correct: torch.Tensor  # [B] masked tokens whose argmax prediction is the original token


def diffusion_loss(logits: torch.Tensor, x0: torch.Tensor, batch: NoisyBatch, normalize: str = "tokens"):
    """sum over masked positions of weight * CE(logits, x0), divided by B * L (`tokens`, the paper) or
    by the number of masked tokens (`masked`). For the linear schedule, weight = 1 / p_mask. In the
    conditional form, `tokens` divides each sequence's sum by its response length, then by B."""
    return diffusion_loss_and_stats(logits, x0, batch, normalize)[0]


def diffusion_loss_and_stats(logits: torch.Tensor, x0: torch.Tensor, batch: NoisyBatch,
                             normalize: str = "tokens") -> tuple[torch.Tensor, SequenceStats]:
    """diffusion_loss, and the per-sequence statistics behind it (detached)."""
    rows = batch.masked
    # Only the masked rows are upcast: at 126k vocab the full logits in fp32 would not fit.
    masked_logits = logits[rows].float()
    ce = F.cross_entropy(masked_logits, x0[rows], reduction="none")
    with torch.no_grad():
        correct = masked_logits.argmax(-1) == x0[rows]
    return loss_and_stats_from_ce(ce, correct, x0, batch, normalize)


def model_loss_and_stats(model, x0: torch.Tensor, batch: NoisyBatch, normalize: str = "tokens",
                         doc_start: torch.Tensor | None = None,
                         block_size: int | None = None, shard=None) -> tuple[torch.Tensor, SequenceStats]:
    """What training calls: the same loss and statistics as diffusion_loss_and_stats(model(ids), ...),
    but the model applies its output head to the masked positions only (pretrain/model/output_head.py),
    so the [B, L, vocab] logits never exist. `model` is the LLaDAModel or the engine wrapping it.
    `block_size` (block diffusion): the model also reads the clean x0 under the block mask; None (or
    callers' B = L, see objective/block.py) is LLaDA's pass over the noisy sequence alone. `shard`
    (sequence parallelism, pretrain/engine/sequence_parallel.py): the model computes this rank's slice of
    the masked rows, and the loss is that slice's share of the whole sequences' loss (the sum of the
    group's losses is the unsplit loss); the statistics are the slice's, for the loop to add up."""
    clean = {} if block_size is None else {"clean_ids": x0, "block_size": block_size}
    split = {} if shard is None else {"shard": shard}
    ce, correct = model(batch.input_ids, doc_start=doc_start, targets=x0, masked=batch.masked, **clean, **split)
    return loss_and_stats_from_ce(ce, correct, x0, batch, normalize, shard)


def loss_and_stats_from_ce(ce: torch.Tensor, correct: torch.Tensor, x0: torch.Tensor, batch: NoisyBatch,
                           normalize: str, shard=None) -> tuple[torch.Tensor, SequenceStats]:
    """The loss from the cross-entropy `ce` [N] (fp32) and argmax hits `correct` [N] of the masked
    positions, in the row-major order of x0[batch.masked]. With `shard`, of this rank's slice of the
    positions (shard.local): the sum is the slice's, the normalisers (B * L, the masked count) are the
    whole sequences', which every rank of the group holds."""
    B, L = x0.shape
    local = (lambda t: t) if shard is None else (lambda t: shard.local(t, 1))  # noqa: E731
    per_token = batch.weight.expand(B, L)
    if batch.response_len is not None and normalize == "tokens":
        per_token = per_token * (L / batch.response_len.clamp_min(1))  # sum / (B * L) below -> per sequence / B
    rows = local(batch.masked)
    weighted = ce * local(per_token)[rows]
    total = weighted.sum()
    loss = total / (B * L) if normalize == "tokens" else total / batch.masked.sum().clamp_min(1)
    with torch.no_grad():
        seq = rows.nonzero()[:, 0]  # the sequence of each masked row, in the order logits[rows] takes them
        per_seq = lambda v: torch.zeros(B, device=x0.device).index_add_(0, seq, v.float())  # noqa: E731
        t = batch.t if batch.t is not None else batch.p_mask[:, 0]
        stats = SequenceStats(t=t.detach().float(), masked=rows.sum(1).float(), ce_sum=per_seq(ce.detach()),
                              weighted_sum=per_seq(weighted.detach()), correct=per_seq(correct.detach()))
    return loss, stats


def random_length(x0: torch.Tensor, prob: float, generator: torch.Generator, multiple: int = 1) -> torch.Tensor:
    """With probability `prob`, cut the whole batch to a length L' ~ U{1..L} (the paper does this for
    1% of batches so the model also sees short inputs); L' ~ U{m, 2m, ..., L} with `multiple` m (block
    diffusion: whole blocks). Seed `generator` identically on every rank (from the step) so that all
    ranks cut the same way."""
    L = x0.shape[1]
    draw = torch.rand(1, generator=generator).item()
    new_len = multiple * int(torch.randint(1, L // multiple + 1, (1,), generator=generator).item())
    return x0[:, :new_len] if draw < prob else x0
