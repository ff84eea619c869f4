# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: demo test install

install: $(INSTALLED)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[test]"
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/unlearn-sweep demo

# Two workers, a test file each at a time (module fixtures such as a Ray instance stay on one
# worker): much of a sweep test is waiting (Ray and MLflow servers, subprocess drivers).
test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile
