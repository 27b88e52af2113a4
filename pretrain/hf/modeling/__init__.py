"""The Hugging Face modeling code that every export ships: configuration_llada.py and modeling_llada.py
from here, the sampler (pretrain/objective/sampler.py) as sampling_llada.py and the KV cache
(pretrain/model/kv_cache.py) as kv_cache_llada.py. Copied as they are into the exported folder, they
import only torch and transformers."""

from pathlib import Path

MODELING_DIR = Path(__file__).resolve().parent
PRETRAIN = MODELING_DIR.parents[1]
# The exported file name -> the file it is a copy of.
MODELING_FILES = {"configuration_llada.py": MODELING_DIR / "configuration_llada.py",
                  "modeling_llada.py": MODELING_DIR / "modeling_llada.py",
                  "sampling_llada.py": PRETRAIN / "objective" / "sampler.py",
                  "kv_cache_llada.py": PRETRAIN / "model" / "kv_cache.py"}
