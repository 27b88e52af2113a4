"""LLaDA 2.0's mixture-of-experts configuration class (config.json of inclusionAI/LLaDA2.0-mini, `model_type:
llada2_moe`), shipped by llada-pretrain in every MoE export next to config.json. It imports only
transformers, so `AutoConfig.from_pretrained(folder, trust_remote_code=True)` works offline.
Keys and defaults are those of the published config.json; three keys of llada-pretrain's training
(expert_bias_update_rate, router_aux_loss_coef, router_z_loss_coef) ride along and are not used here.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class LLaDA2MoeConfig(PretrainedConfig):
    model_type = "llada2_moe"

    def __init__(self, vocab_size: int = 157184, hidden_size: int = 2048, intermediate_size: int = 5120,
                 num_hidden_layers: int = 20, num_attention_heads: int = 16, num_key_value_heads: int = 4,
                 head_dim: int | None = 128, hidden_act: str = "silu", use_qkv_bias: bool = False,
                 use_bias: bool = False, rms_norm_eps: float = 1e-6, max_position_embeddings: int = 16384,
                 rope_theta: float = 600000.0, partial_rotary_factor: float = 0.5, rotary_dim: int | None = None,
                 num_experts: int = 256, num_experts_per_tok: int = 8, moe_intermediate_size: int = 512,
                 num_shared_experts: int | None = 1, first_k_dense_replace: int = 1, score_function: str = "sigmoid",
                 moe_router_enable_expert_bias: bool = True, n_group: int = 8, topk_group: int = 4,
                 routed_scaling_factor: float = 2.5, norm_topk_prob: bool = True, initializer_range: float = 0.02,
                 mask_token_id: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 use_cache: bool = False, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.head_dim, self.hidden_act = num_key_value_heads, head_dim, hidden_act
        self.use_qkv_bias, self.use_bias, self.rms_norm_eps = use_qkv_bias, use_bias, rms_norm_eps
        self.max_position_embeddings, self.rope_theta = max_position_embeddings, rope_theta
        self.partial_rotary_factor, self.rotary_dim = partial_rotary_factor, rotary_dim
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.moe_intermediate_size, self.num_shared_experts = moe_intermediate_size, num_shared_experts
        self.first_k_dense_replace, self.score_function = first_k_dense_replace, score_function
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor, self.norm_topk_prob = routed_scaling_factor, norm_topk_prob
        self.initializer_range, self.mask_token_id, self.use_cache = initializer_range, mask_token_id, use_cache
        kwargs["tie_word_embeddings"] = False
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
