"""The Hugging Face modeling code that every export ships (configuration_llada.py, modeling_llada.py):
copied as they are into the exported folder, they import only torch and transformers."""

from pathlib import Path

MODELING_FILES = ("configuration_llada.py", "modeling_llada.py")
MODELING_DIR = Path(__file__).resolve().parent
