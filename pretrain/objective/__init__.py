"""The diffusion objective: forward process, mask schedules, time sampling, loss, likelihood, sampler.
Pure torch: imports pretrain.config and pretrain.model only."""
