"""The Hugging Face format: config.json and safetensors, reading run checkpoints and exported folders,
the modeling code every export ships (modeling/: torch and transformers only), and the lm-eval model
`llada` (harness.py). May import pretrain.config, pretrain.model, pretrain.checkpoint and data_pipeline;
harness.py also the likelihood estimator and sampler (pretrain.objective) and pretrain.engine.device."""
