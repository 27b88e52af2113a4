"""In the source tree: the sampler that modeling_llada.py imports. An export ships
pretrain/objective/sampler.py itself under this name (MODELING_FILES in __init__.py)."""

from pretrain.objective.sampler import generate, generate_block_rows  # noqa: F401
