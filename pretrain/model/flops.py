"""FLOPs per token and the accelerators' peak throughput: the two numbers behind MFU.

FLOPs per token of training = 6 x (every matmul parameter a token uses: the blocks' projections (of a
mixture of experts: the router, the top_k experts and the shared ones) and the untied output head; the
input embedding is a lookup, not a matmul) + 12 x layers x d_model x seq_len for
bidirectional attention (QK^T and AV, forward and backward; not halved, since there is no causal mask).

Block diffusion (block size B < L) runs x_t and x_0 together, 2L tokens, per L trained tokens: the
FLOPs per trained token are those executed, so the blocks' projections count twice (the output head
once: it reads the noisy half) and the attention counts the (query, key) pairs computed. Dense SDPA
(the CPU path) computes all (2L)^2 pairs; FlexAttention skips the empty tiles and computes about the
pairs the mask opens (`block_attention_pairs`, at tile granularity in practice). MFU reports these
executed FLOPs for the step's block size and backend (`sparse`), not the L-token model FLOPs.
"""

from __future__ import annotations

from pretrain.config import ModelConfig

# Dense bf16 tensor-core peak in TFLOP/s (no sparsity), from the vendors' data sheets. Matched
# against torch.cuda.get_device_name() by substring, first match wins, so more specific names go first.
PEAK_TFLOPS_BF16 = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("H800", 989.0),   # SXM; the LLaDA paper's card
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("MI300X", 1307.0),
    ("MI325X", 1307.0),
)


def ffn_matmul_params(m: ModelConfig, layer: int) -> int:
    """A layer's feed-forward weights that one token multiplies: the dense SwiGLU, or (model.moe) the
    router, its top_k experts and the shared experts (the active parameters, not all experts)."""
    if not m.is_moe_layer(layer):
        return 3 * m.d_model * m.mlp_hidden_size  # ff_proj (gate), up_proj, ff_out
    e = m.moe
    return m.d_model * e.num_experts + 3 * m.d_model * e.expert_hidden_size * (e.top_k + e.num_shared_experts)


def matmul_params(m: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: attention and SwiGLU projections and the head."""
    d, hd = m.d_model, m.head_size
    attn = d * m.n_heads * hd * 2 + d * m.n_kv_heads * hd * 2  # q, attn_out; k, v
    return sum(attn + ffn_matmul_params(m, i) for i in range(m.n_layers)) + d * m.vocab_size


def block_attention_pairs(seq_len: int, block_size: int) -> int:
    """The (query, key) pairs BD3LM's mask opens over 2L tokens: noisy-noisy within a block, noisy to
    the clean blocks before, clean to the clean blocks up to its own."""
    n = seq_len // block_size
    return block_size * seq_len + block_size**2 * (n * (n - 1) // 2) + block_size**2 * (n * (n + 1) // 2)


def flops_per_token(m: ModelConfig, seq_len: int, block_size: int | None = None, sparse: bool = False) -> int:
    """Executed training FLOPs per trained token; `block_size` < seq_len: the 2L pass (dense, or with
    `sparse` the pairs FlexAttention computes)."""
    if block_size is None or block_size >= seq_len:
        return 6 * matmul_params(m) + 12 * m.n_layers * m.d_model * seq_len
    head = m.d_model * m.vocab_size
    pairs = block_attention_pairs(seq_len, block_size) if sparse else (2 * seq_len) ** 2
    return 6 * (2 * (matmul_params(m) - head) + head) + 12 * m.n_layers * m.d_model * pairs // seq_len


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The device's dense bf16 peak, `override` (cluster.peak_tflops) when set; None when unknown (no MFU)."""
    if override:
        return float(override)
    for key, tflops in PEAK_TFLOPS_BF16:
        if key.lower() in device_name.lower():
            return tflops
    return None


def mfu(tokens_per_s_per_device: float, flops_token: int, peak: float | None) -> float | None:
    return None if not peak else tokens_per_s_per_device * flops_token / (peak * 1e12)
