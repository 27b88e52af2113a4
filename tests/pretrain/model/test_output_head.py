"""The output head's bucketed row count: the bf16 CPU memory growth it ended, and that it is exact."""

import torch

from pretrain.model.output_head import OutputHead, chunk_grad, chunk_stats
from tests.conftest import rss_growth_mb


def test_masked_rows_reach_the_matmuls_in_a_few_shapes_only_and_the_padding_is_exact():
    torch.manual_seed(0)
    head = OutputHead(16, 64, 0.02)
    head.chunk_elements = 64 * 300  # chunks of 300 rows: rounded down to whole buckets (256)
    rows = set()

    def recording_stats(logits, targets):  # sees each chunk's logits, h[s:e] @ W^T
        rows.add(logits.shape[0])
        return chunk_stats(logits, targets)

    head.chunk_fns = (recording_stats, chunk_grad)
    for n in (1, 77, 128, 129, 300, 555):
        h = torch.randn(n, 16, requires_grad=True)
        targets = torch.randint(0, 64, (n,))
        ce, correct = head(h, targets)
        ce.sum().backward()
        assert ce.shape == correct.shape == (n,)
        h_ref = h.detach().clone().requires_grad_()
        ref = torch.nn.functional.cross_entropy(h_ref @ head.weight.detach().t(), targets, reduction="none")
        ref.sum().backward()
        torch.testing.assert_close(ce, ref.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-7)
    assert rows == {128, 256}, rows  # 1..555 rows in six calls: two shapes


# bf16 on a CPU with native bf16 (oneDNN's brgemm kernels): without the buckets, 80 steps of the head
# with a varying number of masked rows grew the process by ~100 MB (a kernel JIT-compiled per shape).
# On a CPU without native bf16 the kernels are not JIT-compiled per shape and this passes either way.
PROBE = """
import random, psutil, torch
from pretrain.model.output_head import OutputHead
torch.manual_seed(0); random.seed(0)
head = OutputHead(128, 1024, 0.02).to(torch.bfloat16)
rss = []
for i in range(80):
    n = random.randint(200, 1200)
    h = torch.randn(n, 128, dtype=torch.bfloat16, requires_grad=True)
    ce, _ = head(h, torch.randint(0, 1024, (n,)))
    ce.sum().backward()
    rss.append(psutil.Process().memory_info().rss)
print((rss[-1] - rss[14]) / 2**20)
"""


def test_bf16_head_memory_stays_flat_as_the_masked_row_count_varies():
    growth_mb = rss_growth_mb(PROBE)
    assert growth_mb < 30, f"the bf16 output head grew the process by {growth_mb:.0f} MB in 65 steps"
