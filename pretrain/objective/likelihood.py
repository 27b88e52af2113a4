"""Likelihood bounds of a mask predictor, estimated by Monte Carlo over masks. Pure torch.

The LLaDA paper's likelihood form of the ELBO (arXiv 2502.09992, Eq. 6): for n tokens that may be
masked, draw l ~ U{1..n}, mask exactly l of them uniformly at random, and weight the masked
cross-entropy by n / l. Its expectation bounds -log p of those tokens from above, and it has a lower
variance than masking each token with probability t (the count is exact). With the prompt's tokens
never maskable it bounds -log p(answer | prompt), the paper's conditional likelihood.

Low variance and deterministic: the `mc_num` draws of one sequence take l on a stratified grid (one
random start k, then steps of n / mc_num, wrapped into 1..n, as the published evaluation does), so
every l is marginally uniform and the draws cover the range evenly; all randomness comes from the
generator the caller seeds. The standard errors count the draws as independent, which overstates
the Monte Carlo error of a stratified grid: they are conservative.

The same estimator serves the periodic eval during training (pretrain/loop.py), `python -m
pretrain.evaluate`, and multiple-choice scoring.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.model.transformer import LLaDAModel

Forward = Callable[[torch.Tensor], torch.Tensor]  # ids [B, L] -> logits [B, L, V]


def masked_cross_entropy(forward: Forward, ids: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                         doc_start: torch.Tensor | None = None, block_size: int | None = None) -> torch.Tensor:
    """The cross-entropy (fp32) of the positions `rows` [B, L] marks, in row-major order. A LLaDAModel,
    or a DeepSpeed engine around one, applies its output head to those positions only, as training
    does, so the [B, L, vocab] logits never exist (4 GB at micro batch 4 for the 126k vocabulary) and
    `doc_start` (model.document_mask) keeps attention within documents; any other forward
    ids -> logits is scored from its full logits."""
    if isinstance(getattr(forward, "module", forward), LLaDAModel):
        clean = {} if block_size is None else {"clean_ids": targets, "block_size": block_size}
        return forward(ids, doc_start=doc_start, targets=targets, masked=rows, **clean)[0]
    if block_size is not None:
        raise ValueError("a block diffusion likelihood needs a LLaDAModel (its x_t-with-x_0 pass)")
    if doc_start is not None:
        raise ValueError("document-masked attention needs a LLaDAModel")
    return F.cross_entropy(forward(ids)[rows].float(), targets[rows], reduction="none")


def stratified_counts(n: torch.Tensor, mc_num: int, generator: torch.Generator) -> torch.Tensor:
    """n [B] maskable tokens per sequence -> [B, mc_num] numbers of tokens to mask, each in 1..n."""
    n = n.clamp_min(1).long()
    start = (torch.rand(n.shape, generator=generator) * n).long()  # k - 1, uniform on 0..n-1
    steps = (torch.arange(mc_num)[None, :] * n[:, None]) // mc_num
    return (start[:, None] + steps) % n[:, None] + 1


def draw_masks(maskable: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """maskable [B, L] bool, counts [B, K] -> masks [B, K, L]: exactly counts[b, k] maskable positions."""
    B, L = maskable.shape
    keys = torch.rand(B, counts.shape[1], L, generator=generator)
    keys = keys.masked_fill(~maskable.cpu()[:, None, :], 2.0)  # never chosen before a maskable position
    order = keys.argsort(-1).argsort(-1)  # the rank of each position's key
    return (order < counts[..., None]) & maskable.cpu()[:, None, :]


@torch.no_grad()
def elbo_terms(forward: Forward, x0: torch.Tensor, maskable: torch.Tensor, mask_id: int, mc_num: int,
               generator: torch.Generator, batch_size: int | None = None,
               doc_start: torch.Tensor | None = None, block_size: int | None = None) -> torch.Tensor:
    """x0 [B, L], maskable [B, L] -> [B, mc_num]: per draw, (n / l) x the summed cross-entropy (nats) of
    the l masked tokens; each is an unbiased estimate of the NELBO of the sequence's maskable tokens.
    Runs ceil(B * mc_num / batch_size) forward passes whatever the data (ZeRO-3 ranks stay in step).
    `doc_start` [B, L] bool: attention stays within documents (model.document_mask). `block_size` (a
    block diffusion model, smaller than L): block_elbo_terms."""
    B, L = x0.shape
    if block_size is not None and block_size < L:
        return block_elbo_terms(forward, x0, maskable, mask_id, mc_num, generator, block_size, batch_size, doc_start)
    n = maskable.sum(1).cpu()
    counts = stratified_counts(n, mc_num, generator)
    masks = draw_masks(maskable, counts, generator).to(x0.device).reshape(B * mc_num, L)
    targets = x0.repeat_interleave(mc_num, dim=0)
    noisy = torch.where(masks, mask_id, targets)
    docs = doc_start.to(x0.device).repeat_interleave(mc_num, dim=0) if doc_start is not None else None
    weights = (n.clamp_min(1)[:, None] / counts).reshape(-1).to(x0.device, torch.float64)
    weights = weights * (n > 0).repeat_interleave(mc_num).to(x0.device)  # nothing to score: 0
    batch_size = batch_size or B * mc_num
    terms = torch.zeros(B * mc_num, dtype=torch.float64, device=x0.device)
    for lo in range(0, B * mc_num, batch_size):
        hi = min(lo + batch_size, B * mc_num)
        rows = masks[lo:hi]
        docs_here = docs[lo:hi] if docs is not None else None
        ce = masked_cross_entropy(forward, noisy[lo:hi], targets[lo:hi], rows, docs_here)
        seq = rows.nonzero()[:, 0]
        terms[lo:hi] = torch.zeros(hi - lo, dtype=torch.float64, device=x0.device).index_add_(0, seq, ce.double())
    return (terms * weights).reshape(B, mc_num)


def block_elbo_terms(forward: Forward, x0: torch.Tensor, maskable: torch.Tensor, mask_id: int, mc_num: int,
                     generator: torch.Generator, block_size: int, batch_size: int | None = None,
                     doc_start: torch.Tensor | None = None) -> torch.Tensor:
    """The block NELBO: in each block j (absolute positions; a last block may be shorter), exactly
    l_j ~ U{1..n_j} of its n_j maskable tokens are masked (stratified over the draws) and weighted
    n_j / l_j, all blocks in one x_t-with-x_0 pass. Per draw, the sum over blocks estimates the sum of
    each block's NELBO given the clean blocks before it: a bound on -log p of the maskable tokens. A
    prompt's tokens are never masked, so a prompt that ends inside a block leaves that block's rest
    maskable; a block with nothing maskable adds 0."""
    B, L = x0.shape
    nb = -(-L // block_size)
    padded = torch.zeros(B, nb * block_size, dtype=torch.bool)
    padded[:, :L] = maskable.cpu()
    per_block = padded.view(B * nb, block_size)
    n = per_block.sum(1)
    counts = stratified_counts(n, mc_num, generator)  # [B * nb, K]
    masks = draw_masks(per_block, counts, generator)  # [B * nb, K, bs]
    masks = masks.view(B, nb, mc_num, block_size).permute(0, 2, 1, 3).reshape(B * mc_num, -1)[:, :L].to(x0.device)
    w = (n.clamp_min(1)[:, None] / counts * (n > 0)[:, None]).double()  # [B * nb, K]
    w = w.view(B, nb, mc_num).permute(0, 2, 1).repeat_interleave(block_size, dim=2).reshape(B * mc_num, -1)[:, :L]
    w = w.to(x0.device)
    targets = x0.repeat_interleave(mc_num, dim=0)
    noisy = torch.where(masks, mask_id, targets)
    docs = doc_start.to(x0.device).repeat_interleave(mc_num, dim=0) if doc_start is not None else None
    batch_size = batch_size or B * mc_num
    terms = torch.zeros(B * mc_num, dtype=torch.float64, device=x0.device)
    for lo in range(0, B * mc_num, batch_size):
        hi = min(lo + batch_size, B * mc_num)
        rows = masks[lo:hi]
        ce = masked_cross_entropy(forward, noisy[lo:hi], targets[lo:hi], rows,
                                  docs[lo:hi] if docs is not None else None, block_size)
        seq = rows.nonzero()[:, 0]
        terms[lo:hi] = torch.zeros(hi - lo, dtype=torch.float64, device=x0.device).index_add_(
            0, seq, ce.double() * w[lo:hi][rows])
    return terms.reshape(B, mc_num)


@dataclass
class Estimate:
    nelbo: float  # per token, nats: an upper bound on -log p per token, estimated
    se: float  # standard error over sequences (the data's spread and the Monte Carlo error together)
    mc_se: float  # the Monte Carlo part alone (conservative)
    tokens: int
    sequences: int

    @property
    def perplexity_bound(self) -> float:
        return math.exp(self.nelbo)


class NelboSums:
    """Running sums from which the per-token estimate and its standard errors follow; a tensor, so
    data-parallel ranks can all_reduce it. Per sequence b: e = mean of its draws, m = its tokens,
    v = the variance of its draws' mean."""

    FIELDS = ("count", "e", "m", "ee", "em", "mm", "v")

    def __init__(self, sums: torch.Tensor | None = None):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64) if sums is None else sums

    def add(self, terms: torch.Tensor, tokens: torch.Tensor) -> None:
        terms, m = terms.double().cpu(), tokens.double().cpu()
        e = terms.mean(1)
        k = terms.shape[1]
        v = terms.var(1) / k if k > 1 else torch.zeros_like(e)
        self.sums += torch.stack([torch.tensor(float(len(e)), dtype=torch.float64), e.sum(), m.sum(), (e * e).sum(),
                                  (e * m).sum(), (m * m).sum(), v.sum()])

    def estimate(self) -> Estimate:
        count, e, m, ee, em, mm, v = self.sums.tolist()
        r = e / m
        # The ratio estimator's variance: sum over sequences of (e_b - r m_b)^2, / (N (N-1) mean(m)^2).
        spread = max(ee - 2 * r * em + r * r * mm, 0.0)
        se = math.sqrt(spread / (count * (count - 1))) / (m / count) if count > 1 else float("nan")
        return Estimate(nelbo=r, se=se, mc_se=math.sqrt(v) / m, tokens=int(m), sequences=int(count))


def nelbo_of_batch(forward: Forward, x0: torch.Tensor, mask_id: int, mc_num: int, generator: torch.Generator,
                   prompt_len: torch.Tensor | None = None, batch_size: int | None = None,
                   doc_start: torch.Tensor | None = None, block_size: int | None = None) -> NelboSums:
    """The estimate's sums for one batch; with prompt_len [B], the prompt is never masked nor scored;
    with doc_start [B, L], attention stays within documents."""
    B, L = x0.shape
    maskable = torch.ones(B, L, dtype=torch.bool, device=x0.device)
    if prompt_len is not None:
        maskable &= torch.arange(L, device=x0.device)[None, :] >= prompt_len.to(x0.device)[:, None]
    sums = NelboSums()
    sums.add(elbo_terms(forward, x0, maskable, mask_id, mc_num, generator, batch_size, doc_start, block_size),
             maskable.sum(1))
    return sums


def draw_seed(seed: int, item: int, choice: int) -> int:
    """The mask draws' seed for one (item, choice) pair: the same whatever the order or the process that
    scores it (pretrain.evaluate --choices and the lm-eval adapter both use it)."""
    return seed * 1_000_003 + item * 1009 + choice


def answer_nll(forward: Forward, prompt: list[int], answer: list[int], mask_id: int, mc_num: int,
               generator: torch.Generator, batch_size: int | None = None, device="cpu",
               block_size: int | None = None) -> tuple[float, float]:
    """The paper's conditional likelihood: an estimate of -log p(answer | prompt) (nats, summed over the
    answer's tokens; an upper bound in expectation) and its Monte Carlo standard error. The prompt is
    never masked; the draws are batched."""
    x0 = torch.tensor([prompt + answer], device=device)
    maskable = torch.zeros_like(x0, dtype=torch.bool)
    maskable[0, len(prompt):] = True
    terms = elbo_terms(forward, x0, maskable, mask_id, mc_num, generator, batch_size, block_size=block_size)[0]
    se = (terms.std() / math.sqrt(mc_num)).item() if mc_num > 1 else float("nan")
    return terms.mean().item(), se
