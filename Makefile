# make demo: train a tiny LLaDA on the built-in corpus on this machine's CPU, then print a sample.
# make test: the whole test suite (CPU only).
# Both create .venv and install what is missing first.

VENV ?= .venv
PY := $(VENV)/bin/python
# Installed first, and only when the venv has no torch: pinned, so pip takes the local CPU build
# instead of pulling a multi-GB CUDA build. On a GPU machine: make install TORCH_SPEC=torch==2.13.0
# with your CUDA index, or create the venv with torch already in it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-hf system-deps demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The hf extra (transformers, lm-eval): using a trained model, not training; the tests need it.
install-hf: $(VENV)/.installed-hf

$(VENV)/.installed-hf: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,hf]"
	touch $@

demo: install
	rm -rf outputs/demo
	$(PY) -m pretrain.train experiment=demo   # conf/experiment/demo.yaml: its settings and why
	$(PY) -m pretrain.report outputs/demo

# The SLURM launch tests start a two-node cluster on loopback (launch/local_cluster.py): Debian's slurm-wlm,
# and unshare/mount from util-linux for each node's namespace (root or sudo).
system-deps:
	@command -v slurmctld >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q slurm-wlm; }

test: install install-hf system-deps
	$(PY) -m pytest -q --durations=20 tests

lint: install
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check pretrain data_pipeline launch tests bench

clean:
	rm -rf outputs .pytest_cache
