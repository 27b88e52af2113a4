"""The output head, and its memory-lean training path: head + cross-entropy on the masked rows only.

Training needs the logits of masked positions alone (about half of them), and even those need not
exist all at once: `LinearCrossEntropy` computes them a chunk of rows at a time, keeps only each
row's log-sum-exp, cross-entropy and argmax hit, and recomputes each chunk's logits in the
backward. At vocab 126464 and 16k tokens a micro-batch, the full bf16 logits would be 4 GB plus an
fp32 copy of the masked rows; here one chunk (`CHUNK_ELEMENTS` fp32 logits, 512 MB) is alive at a time.

The gradients are those of `cross_entropy(logits[rows].float(), targets)` with logits = h W^T: for
each row, (softmax - onehot) x dCE, cast to the compute dtype before the matmuls, as autograd does.
The per-chunk elementwise work is two plain functions (`chunk_stats`, `chunk_grad`) that
`trainer.compile` compiles (`OutputHead.compile_loss`).

The masked rows are padded to a multiple of `ROW_BUCKET` (zero rows, their loss dropped: exact). Their
number changes every step, and on a CPU oneDNN JIT-compiles a bf16 matmul kernel for every new shape
and keeps it: a bf16 run's resident memory grew from 0.67 GB at step 1 to 3.05 GB at step 300 until the
shapes were bucketed. The padding costs at most ROW_BUCKET - 1 rows of work.
"""

from __future__ import annotations

import torch
import torch.nn as nn

CHUNK_ELEMENTS = 2**27  # fp32 logits per chunk (512 MB): rows per chunk = CHUNK_ELEMENTS // vocab
ROW_BUCKET = 128  # masked rows are padded to a multiple of this: a few matmul shapes, not one per step


def chunk_stats(logits: torch.Tensor, targets: torch.Tensor):
    """One chunk's logits [n, V] -> log-sum-exp and cross-entropy (fp32), argmax == target."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    return lse, lse - logits.gather(1, targets[:, None])[:, 0], logits.argmax(dim=-1) == targets


def chunk_grad(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, grad_ce: torch.Tensor):
    """d(ce) / d(logits) x grad_ce = (softmax - onehot) x grad_ce, in the logits' dtype."""
    g = torch.exp(logits.float() - lse[:, None])
    g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
    return (g * grad_ce[:, None]).to(logits.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """(h [N, d], weight [V, d], targets [N]) -> (cross-entropy [N] fp32, argmax == target [N] bool).
    `fns` = (chunk_stats, chunk_grad), or compiled versions of them (OutputHead.compile_loss)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, fns):
        stats, _ = fns
        N = h.shape[0]
        ce = torch.empty(N, dtype=torch.float32, device=h.device)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        correct = torch.empty(N, dtype=torch.bool, device=h.device)
        for s in range(0, N, chunk_rows):
            e = min(s + chunk_rows, N)
            lse[s:e], ce[s:e], correct[s:e] = stats(h[s:e] @ weight.t(), targets[s:e])
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk_rows, ctx.fns = chunk_rows, fns
        ctx.mark_non_differentiable(correct)
        return ce, correct

    @staticmethod
    def backward(ctx, grad_ce, _grad_correct):
        h, weight, targets, lse = ctx.saved_tensors
        N, step = h.shape[0], ctx.chunk_rows
        _, grad = ctx.fns
        grad_h = torch.empty_like(h)
        # Several chunks add into the weight's gradient: sum them in fp32, round once.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32 if N > step else weight.dtype, device=weight.device)
        for s in range(0, N, step):
            e = min(s + step, N)
            g = grad(h[s:e] @ weight.t(), lse[s:e], targets[s:e], grad_ce[s:e])
            grad_h[s:e] = g @ weight
            grad_w += (g.t() @ h[s:e]).to(grad_w.dtype)
        return grad_h, grad_w.to(weight.dtype), None, None, None


class OutputHead(nn.Linear):
    """The untied output head (`transformer.ff_out`). head(h) gives logits (eval, sampling);
    head(h_rows, targets) gives (cross-entropy, argmax hit) per row without the logits existing.
    One module call either way, so ZeRO-3 gathers the weight once, around the whole computation."""

    def __init__(self, d_in: int, vocab: int, std: float):
        super().__init__(d_in, vocab, bias=False)
        nn.init.normal_(self.weight, mean=0.0, std=std)
        self.chunk_elements = CHUNK_ELEMENTS
        self.chunk_fns = (chunk_stats, chunk_grad)

    def compile_loss(self, backend: str = "inductor") -> None:
        """Compile the elementwise work around the head's matmuls (trainer.compile): log-sum-exp,
        cross-entropy and argmax in one pass over a chunk's logits, and the softmax gradient in one
        more, instead of an fp32 copy of the chunk and a pass per op. The matmuls stay cuBLAS's.
        dynamic=True: the number of masked rows changes every batch."""
        self.chunk_fns = tuple(torch.compile(fn, backend=backend, dynamic=True) for fn in (chunk_stats, chunk_grad))

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None):
        if targets is None:
            return super().forward(h)
        chunk_rows = max(1, self.chunk_elements // self.weight.shape[0])
        if chunk_rows >= ROW_BUCKET:  # whole buckets a chunk, so the last chunk's shape repeats too
            chunk_rows -= chunk_rows % ROW_BUCKET
        n = h.shape[0]
        pad = -n % ROW_BUCKET
        if pad:  # zero rows: their loss is dropped below, so they add exactly nothing to either gradient
            h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
            targets = torch.cat([targets, targets.new_zeros(pad)])
        ce, correct = LinearCrossEntropy.apply(h, self.weight, targets, chunk_rows, self.chunk_fns)
        return ce[:n], correct[:n]
