# Every target creates .venv when it is missing and installs the project into it.
# TORCH_SPEC is overridable: on machines with a local CPU wheel keep torch==2.13.0; a bare
# `torch` requirement with nothing installed pulls a CUDA build of several GB.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,hf]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/attnmem compare

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/exact.py

clean:
	rm -rf $(VENV) report .pytest_cache
