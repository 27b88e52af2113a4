"""In the source tree: the KV caches that modeling_llada.py imports. An export ships
pretrain/model/kv_cache.py itself under this name (MODELING_FILES in __init__.py)."""

from pretrain.model.kv_cache import make_cache  # noqa: F401
