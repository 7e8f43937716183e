# Two entry points: `make serve` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU host, install the CUDA build of your choice first.
TORCH ?= torch==2.13.0

.PHONY: serve test lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

serve: $(BIN)/.installed
	$(BIN)/loomserve serve

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy .

test: lint
	$(BIN)/loomserve fetch-model
	$(BIN)/python -m pytest
