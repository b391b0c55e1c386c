# The two commands of the README: `make demo` (the QLoRA demo) and `make test`. Each creates or updates the
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

# nvcc for the compile check of csrc/*.cu (no GPU needed): from PATH, else CUDA's default place.
NVCC ?= $(or $(shell command -v nvcc 2>/dev/null),$(wildcard /usr/local/cuda/bin/nvcc))
CU_SOURCES := $(wildcard csrc/*.cu)
CU_ARCHS := sm_80 sm_90a
CU_OBJECTS := $(foreach a,$(CU_ARCHS),$(patsubst csrc/%.cu,build/cuda-objects/%.$(a).o,$(CU_SOURCES)))

.PHONY: demo test bench clean cuda-objects

# The package, with lowrank._C built in place (an editable install); csrc/ changes rebuild it.
$(STAMP): setup.py Makefile $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lowrank.demo

test: $(STAMP) cuda-objects
	$(PY) -m pytest

# Every csrc/*.cu must compile to an object file for sm_80 and sm_90a (the kernels and their
# launchers include no torch header, so no CUDA torch is needed). Without nvcc: a loud skip.
ifeq ($(NVCC),)
cuda-objects:
	@echo "!!! cuda-objects: nvcc not found (PATH, /usr/local/cuda/bin): csrc/*.cu NOT compile-checked !!!"
else
cuda-objects: $(CU_OBJECTS)

build/cuda-objects/%.sm_80.o: csrc/%.cu $(wildcard csrc/*.h)
	@mkdir -p $(@D)
	$(NVCC) -std=c++17 -O3 -gencode=arch=compute_80,code=sm_80 -c $< -o $@

build/cuda-objects/%.sm_90a.o: csrc/%.cu $(wildcard csrc/*.h)
	@mkdir -p $(@D)
	$(NVCC) -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -c $< -o $@
endif

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
