"""The DeepSpeed engine: process group, ZeRO-3 setup and sizes, device and precision, lr schedule.
May import pretrain.config, pretrain.model and pretrain.hf (init_from weights)."""
