"""The network: the bidirectional transformer, attention backends, the masked-only output head, FLOPs.
Pure torch: imports only pretrain.config (for ModelConfig), never DeepSpeed, Hydra or another domain."""
