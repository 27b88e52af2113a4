"""What the hardware can do: precision choice, and oneDNN's kernel caches bounded on the CPU."""

from pretrain.engine.device import resolve_precision
from tests.conftest import rss_growth_mb


def test_auto_precision_follows_the_cpu_flags():
    assert resolve_precision("auto", "cpu", {"avx2", "avx512_bf16"}) == "bf16"
    assert resolve_precision("auto", "cpu", {"avx2", "amx_bf16"}) == "bf16"
    assert resolve_precision("auto", "cpu", {"avx2", "avx512f"}) == "fp32"
    assert resolve_precision("auto", "cuda", set()) == "bf16"
    assert resolve_precision("fp32", "cuda", set()) == "fp32"


# The tiny model in bf16, each step at another sequence length (a random-length batch): oneDNN compiles
# kernels for each new shape. Unbounded, its two caches grew this process by ~300 MB in 30 steps on a
# CPU with native bf16; bounded, old shapes are evicted. (Without native bf16 it stays flat either way.)
PROBE = """
import random, sys, psutil, torch
from pretrain.checks import compose_config
from pretrain.engine.device import bound_cpu_kernel_caches
from pretrain.model.transformer import LLaDAModel
if BOUND:
    bound_cpu_kernel_caches()
torch.manual_seed(0); random.seed(0)
cfg = compose_config(["model=tiny", "model.vocab_size=512", "model.n_layers=2", "model.attention=sdpa"]).model
model = LLaDAModel(cfg).to(torch.bfloat16)
rss = []
for length in random.sample(range(16, 256), 40):
    x = torch.randint(0, 512, (2, length))
    masked = torch.rand(2, length) < 0.5
    masked[:, 0] = True
    ce, _ = model(x, targets=x, masked=masked)
    ce.sum().backward()
    rss.append(psutil.Process().memory_info().rss)
print((rss[-1] - rss[9]) / 2**20)
"""


def test_bf16_cpu_kernel_caches_stay_bounded_as_shapes_change():
    growth_mb = rss_growth_mb("BOUND = True\n" + PROBE)
    assert growth_mb < 60, f"bf16 steps of new shapes grew the process by {growth_mb:.0f} MB in 30 steps"
