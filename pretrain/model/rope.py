"""Rotary position embeddings in the "rotate half" form (LLaDA's and Llama's), with Llama 3's
frequency scaling for models warm-started from Llama 3.x (`model.rope_scaling`).

Llama 3 (transformers' `_compute_llama3_parameters`): wavelengths longer than
original_max_position_embeddings / low_freq_factor are divided by `factor`, those shorter than
original / high_freq_factor are kept, and the band between is interpolated smoothly. A source model
was trained with these frequencies; computing them otherwise would move every position it knows.
"""

from __future__ import annotations

import math

import torch

from pretrain.config import require

ROPE_TYPES = ("llama3",)
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_scaling(scaling: dict | None, where: str = "model.rope_scaling") -> None:
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    require(kind in ROPE_TYPES, f"{where}: rope_type={kind!r} is not supported (only {', '.join(ROPE_TYPES)} or null)")
    missing = [k for k in LLAMA3_KEYS if k not in scaling]
    require(not missing, f"{where}: rope_type=llama3 needs {missing[:1]}")
    require(scaling["high_freq_factor"] > scaling["low_freq_factor"],
            f"{where}: high_freq_factor={scaling['high_freq_factor']} must exceed low_freq_factor="
            f"{scaling['low_freq_factor']}")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None, device=None) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(seq_len: int, head_dim: int, theta: float, device,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [L, D] in fp32, the frequencies repeated over both halves (rotate-half form)."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling, device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D]; rotates pairs (i, i + D/2), as LLaDA and Llama do."""
    r = cos.shape[-1]
    if r < x.shape[-1]:  # partial rotary (LLaDA 2.0): the first r dims of each head turn, the rest pass
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)
