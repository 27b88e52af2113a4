"""Monitoring: metrics.jsonl and W&B, per-step statistics, the report's pictures.
May import pretrain.config, pretrain.model (FLOPs) and pretrain.objective (per-sequence statistics)."""
