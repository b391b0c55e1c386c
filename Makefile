# The two commands of the README: `make demo` and `make test`. Each creates or updates the
# virtual environment .venv first, so a fresh machine needs nothing else.
#
# TORCH is what pip installs for PyTorch before the package. The default, torch==2.13.0,
# is the CPU build on the CI and development machines of this project. On a machine with
# an NVIDIA GPU use a CUDA build instead, e.g.
#   make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# (docs/install.md).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) benchmarks/bench_nf4_codec.py

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
