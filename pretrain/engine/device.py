"""What the hardware can do, asked once at setup: which precision a `trainer.precision=auto` run
trains in, and the device and dtype that inference (generate, evaluate) runs in.

On a CPU without native bf16 instructions (AVX-512 BF16 or AMX), bf16 matmuls are emulated and run
about 8x slower than fp32 (measured on an AVX2-only AMD EPYC, the tiny model forward+backward:
2,726 tokens/s in fp32 against 324 in bf16), so `auto` picks fp32 there. GPUs train in bf16.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PRECISION_CHOICES = ("auto", "bf16", "fp32")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: assume the least
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def resolve_precision(precision: str, device: str, flags: set[str] | None = None) -> str:
    """`auto` -> bf16 on an accelerator or a CPU with native bf16, else fp32; others pass through."""
    if precision != "auto":
        return precision
    if device != "cpu":
        return "bf16"
    return "bf16" if cpu_has_native_bf16(flags) else "fp32"


# oneDNN keeps a JIT-compiled kernel for every bf16 matmul shape it meets, in two caches of 1024 entries
# each (oneDNN's primitive cache and ideep's LRU cache in front of it), ~2.5 MB an entry. A bf16 CPU run
# meets new shapes with every random-length batch (mask.random_length_prob), every eval batch and the
# output head's row buckets, and kept them all. Capped, old shapes are evicted and rebuilt when met again
# (a few ms each). The demo in bf16 from step 100 to 1000: +13% at 32 entries, +6% at 24 (BENCHMARKS.md);
# a training step uses ~21 kernels (ONEDNN_VERBOSE=1 lists them). Read once, at oneDNN's first use.
CPU_KERNEL_CACHE_ENTRIES = 24


def bound_cpu_kernel_caches() -> None:
    """Caps oneDNN's kernel caches (call before the first matmul; a value set in the environment wins)."""
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(var, str(CPU_KERNEL_CACHE_ENTRIES))


# Inference (generate, evaluate): one device and dtype, no engine.
def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
