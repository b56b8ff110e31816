# kphi3-kernels: every target sets up what it needs first (a virtual environment in $(VENV),
# PyTorch, this package with its test and benchmark tools), so on a fresh clone
#
#     make bench      # the quick benchmark: the kernels against nn.Linear
#     make test       # the whole test suite
#
# run as they are. `make help` lists the rest.

PYTHON ?= python3
VENV ?= .venv
# Where a machine without an NVIDIA GPU gets PyTorch: its CPU build (about 200 MB, not the
# multi-GB CUDA build that a plain `pip install torch` picks on Linux).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core by default; JOBS=0 runs in this process.
JOBS ?= auto

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.kphi3-installed

# A subset of about two minutes on a 2-core CPU that runs every op and both backends (the
# Triton kernels through the interpreter on a CPU), the fused decoder and the model.
FAST_TESTS := tests/test_reference.py tests/test_bad_input.py tests/test_modules.py \
	tests/test_torch_backend.py tests/test_backend.py tests/test_fused_contract.py \
	tests/test_contract_checks.py tests/test_sanitizer.py tests/test_model_config.py \
	tests/test_model_kernels.py tests/test_fused_fuzz.py

# The kernels' tests under the sanitizer (docs/sanitizer.md), in one process (its summary and
# its every-kernel-launched check see the whole run): races between the programs of a
# launch, out-of-bounds accesses, and results that depend on the programs' order. The subset
# marked `sanitize` launches every kernel of the package, in every GPU config.
SANITIZE_TESTS := tests/test_ops_parity.py tests/test_fused_decoder.py tests/test_residual_norm.py \
	tests/test_split_k.py tests/test_activation_layout.py

.PHONY: help install test test-fast sanitize bench bench-full clean

help:
	@echo "make bench       the quick benchmark: each shape's time as a fraction of nn.Linear's (15-25 s on a 2-core CPU)"
	@echo "make test        the whole test suite (about 10 min on a 2-core CPU, in JOBS processes)"
	@echo "make test-fast   a subset of about 2 min: every op, both backends, the fused decoder, the model"
	@echo "make sanitize    the kernels' tests under the interpreter sanitizer (races, out-of-bounds; about 3 min)"
	@echo "make bench-full  the full sweep (about 10 min on a 2-core CPU): bench-full.json, rewritten as rows"
	@echo "                 finish, and plots in bench-full-plots/; add --resume to its command to go on after Ctrl-C"
	@echo "make install     only set up $(VENV) (PyTorch kept where installed, else the CPU build"
	@echo "                 without an NVIDIA GPU), then this package with its test tools"
	@echo "make clean       remove $(VENV)"
	@echo "Variables: PYTHON=$(PYTHON) VENV=$(VENV) JOBS=$(JOBS) TORCH_CPU_INDEX=$(TORCH_CPU_INDEX) PYTEST_ARGS=..."

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# PyTorch first, so that resolving this package's torch requirement keeps it: an installed
# torch stays; with an NVIDIA GPU, the default (CUDA) build; without one, a CPU build from pip's
# --find-links folder where one lies there for this Python, else from the CPU index.
$(STAMP): $(PY) setup.cfg pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q torch; \
	else \
		tag=$$($(PY) -c 'import sys; print("cp%d%d" % sys.version_info[:2])'); \
		wheel=$$(ls $${PIP_FIND_LINKS:-/nonexistent}/torch-*+cpu-$$tag-*.whl 2>/dev/null | tail -n 1); \
		if [ -n "$$wheel" ]; then $(PIP) install -q "$$wheel"; \
		else $(PIP) install -q torch --index-url $(TORCH_CPU_INDEX); fi; \
	fi
	$(PIP) install -q -e ".[test]"
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) $(PYTEST_ARGS)

test-fast: $(STAMP)
	KPHI3_FUZZ_CASES=100 $(PY) -m pytest -q -n $(JOBS) $(FAST_TESTS) $(PYTEST_ARGS)

sanitize: $(STAMP)
	$(PY) -m pytest -q --sanitize -m sanitize $(SANITIZE_TESTS) $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m kphi3_bench.run --quick

bench-full: $(STAMP)
	$(PY) -m kphi3_bench.run --out bench-full.json --plot bench-full-plots

clean:
	rm -rf $(VENV)
