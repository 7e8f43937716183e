# Two entry points: `make serve` and `make test`. Both build .venv on first use, with exactly
# the versions in requirements/test.lock (hash-checked), then torch, then loomserve itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# The CPU build of torch, pinned in one file (the lock was resolved against it). On a GPU host,
# name the CUDA build of your choice instead, e.g. TORCH=torch==2.13.0 (PyPI's CUDA 13 build).
TORCH ?= -r requirements/torch-cpu.txt
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Where `make lock` finds the CPU build of torch: a folder or an HTML page of wheels.
TORCH_FIND_LINKS ?= https://download.pytorch.org/whl/cpu/torch/
UV := uv==0.13.10

.PHONY: serve test lint lock lock-upgrade

# torch's CPU wheels are not on PyPI: the install tries PyPI (and any local wheels pip is
# configured with) first, then PyTorch's CPU index. torch's own dependencies are in the lock.
$(BIN)/.installed: requirements/test.lock requirements/torch-cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --require-hashes --no-deps -r requirements/test.lock
	$(PIP) install --quiet $(TORCH) 2>/dev/null || $(PIP) install --quiet --extra-index-url $(TORCH_INDEX) $(TORCH)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PIP) check
	touch $@

serve: $(BIN)/.installed
	$(BIN)/loomserve serve

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy .

test: lint
	$(BIN)/loomserve fetch-model
	$(BIN)/python -m pytest

# Refresh the locks after changing a dependency in pyproject.toml (pins that still fit are
# kept); `make lock-upgrade` moves every pin to the newest release pyproject.toml allows.
# Both resolve once for Python 3.11 and 3.12 on every platform, with the CPU build of torch.
LOCK = $(VENV)-lock/bin/uv pip compile pyproject.toml --quiet --universal --python-version 3.11 \
	--generate-hashes --override requirements/torch-cpu.txt --no-emit-package torch \
	--find-links $(TORCH_FIND_LINKS) --custom-compile-command "make lock"

$(VENV)-lock/bin/uv:
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet "$(UV)"

lock: $(VENV)-lock/bin/uv
	$(LOCK) $(LOCK_FLAGS) --extra gpu --extra test -o requirements/test.lock
	$(LOCK) $(LOCK_FLAGS) --extra gpu -c requirements/test.lock -o requirements/serve.lock

lock-upgrade: LOCK_FLAGS = --upgrade
lock-upgrade: lock
