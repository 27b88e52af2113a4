"""The Hugging Face format: config.json and safetensors, reading run checkpoints and exported folders.
May import pretrain.config, pretrain.model, pretrain.checkpoint and data_pipeline."""
