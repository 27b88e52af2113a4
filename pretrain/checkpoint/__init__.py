"""Checkpoints: save and load, file digests and manifests, DeepSpeed's files, universal conversion,
resume checks, the run_dir lock. May import pretrain.config and data_pipeline only."""
