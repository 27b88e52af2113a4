"""LLaDA's Hugging Face configuration class, shipped by llada-pretrain in every exported folder (next to
config.json, whose `auto_map` names it). It imports only transformers, so a folder loads with
`AutoConfig.from_pretrained(folder, trust_remote_code=True)` offline, with nothing else installed.

The keys are the published config.json's (GSAI-ML/LLaDA-8B-Base); an absent key means LLaDA's value,
not OLMo's (the published loader falls back to OLMo's, e.g. rope_theta 10000 and a tied head). Keys
beyond the published ones, each absent in a plain LLaDA config:
  include_qkv_bias   biases on q_proj, k_proj, v_proj
  qk_norm            "per_head_rms": RMSNorm over each head of q and k, after the projection, before RoPE
  weight_tying       logits = h @ wte.weight.T (no separate output head)
  rope_scaling       {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings"} as in transformers' Llama config
  shift_prediction   position i's logits predict token i + 1 (Dream's shift): the raw logits move right by one
"""

from __future__ import annotations

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    # transformers' generic names, for code that asks for them
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                     "num_key_value_heads": "n_kv_heads", "max_position_embeddings": "max_sequence_length"}

    def __init__(self, d_model: int = 4096, n_heads: int = 32, n_kv_heads: int | None = None, n_layers: int = 32,
                 mlp_hidden_size: int = 12288, vocab_size: int = 126464, embedding_size: int | None = None,
                 max_sequence_length: int = 4096, rope_theta: float = 500000.0, rms_norm_eps: float = 1e-5,
                 init_std: float = 0.02, include_qkv_bias: bool = False, qk_norm: str | None = None,
                 weight_tying: bool = False, rope_scaling: dict | None = None, shift_prediction: bool = False,
                 mask_token_id: int = 126336, eos_token_id: int = 126081, pad_token_id: int = 126081,
                 use_cache: bool = False, block_size: int | None = None, **kwargs):
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self.mlp_hidden_size, self.vocab_size = mlp_hidden_size, vocab_size
        self.embedding_size = embedding_size if embedding_size is not None else vocab_size
        self.max_sequence_length, self.rope_theta, self.rms_norm_eps = max_sequence_length, rope_theta, rms_norm_eps
        self.init_std = init_std
        self.include_qkv_bias, self.qk_norm, self.weight_tying = include_qkv_bias, qk_norm, weight_tying
        self.shift_prediction = shift_prediction
        self.block_size = block_size  # block diffusion: each block attends to itself and the blocks before it
        if isinstance(getattr(type(self), "rope_scaling", None), property):
            self.rope_parameters = rope_scaling  # transformers 5: rope_scaling is a (deprecated) alias of this
        else:
            self.rope_scaling = rope_scaling
        self.mask_token_id, self.use_cache = mask_token_id, use_cache
        # The output head is tied (or not) by the model itself: transformers' own tying stays off.
        kwargs["tie_word_embeddings"] = False
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
