"""ZeRO-3 communication sizes derived from the model's shape (the `auto` values of conf/deepspeed).

ZeRO-3 gathers each block's weights before its forward and reduce-scatters its gradients after its
backward. Sizes in elements:
  stage3_prefetch_bucket_size: one block's parameters, so the next block's gather is in flight
      while the current block computes (smaller: the gather stalls the GPU; larger: only memory);
  reduce_bucket_size: one block's parameters, so each block's gradients leave in one collective
      instead of many small ones, while at most two blocks' gradients wait in the buffers;
  stage3_param_persistence_threshold: 10 x d_model, so the RMSNorm gains (d_model each) stay whole
      on every rank (gathering a few KB costs more in latency than it saves) and no matrix does.
A number in conf/deepspeed (or `deepspeed.zero_optimization.KEY=...` on the command line) wins.
"""

from __future__ import annotations

from pretrain.config import ModelConfig


def ffn_params(m: ModelConfig, layer: int) -> int:
    """A layer's feed-forward: the dense SwiGLU, or the router, every routed expert and the shared ones."""
    if not m.is_moe_layer(layer):
        return 3 * m.d_model * m.mlp_hidden_size
    e = m.moe
    return m.d_model * e.num_experts + 3 * m.d_model * e.expert_hidden_size * (e.num_experts + e.num_shared_experts)


def block_params(m: ModelConfig, layer: int | None = None) -> int:
    """One block's parameters; layer None: the largest block (a mixture of experts' when there is one)."""
    if layer is None:
        return max(block_params(m, i) for i in range(m.n_layers))
    d, hd = m.d_model, m.head_size
    extra = (m.n_heads + 2 * m.n_kv_heads) * hd if m.qkv_bias else 0  # q, k, v biases
    extra += 2 * hd if m.qk_norm else 0
    return 2 * d * m.n_heads * hd + 2 * d * m.n_kv_heads * hd + ffn_params(m, layer) + 2 * d + extra


def derived_sizes(m: ModelConfig) -> dict[str, int]:
    return {"stage3_prefetch_bucket_size": block_params(m), "reduce_bucket_size": block_params(m),
            "stage3_param_persistence_threshold": 10 * m.d_model}


def resolve_zero_sizes(section: dict, m: ModelConfig) -> dict:
    """The deepspeed section with each `auto` size of zero_optimization replaced by its derived value."""
    zero = section.get("zero_optimization")
    if not isinstance(zero, dict):
        return section
    sizes = derived_sizes(m)
    resolved = {k: sizes[k] if v == "auto" and k in sizes else v for k, v in zero.items()}
    return {**section, "zero_optimization": resolved}
