# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: demo test install

install: $(INSTALLED)

# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
# DeepSpeed compiles its CPU shared-memory collective at its first use (about 40 s of g++): once
# here, into TORCH_EXTENSIONS_DIR, not inside the first test or trial that starts it (optional:
# the demo never starts DeepSpeed).
export BUILD_DEEPSPEED_CPU_COMM := from deepspeed.accelerator import get_accelerator; \
	get_accelerator().create_op_builder("ShareMemCommBuilder").load()
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[test]"
	DS_ACCELERATOR=cpu $(BIN)/python -c "$$BUILD_DEEPSPEED_CPU_COMM" || echo "note: DeepSpeed's CPU collective \
	was not compiled (no C++ compiler?): only runs under DeepSpeed on a CPU need it, and compile it first"
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/unlearn-sweep demo

# Two workers, a test file each at a time (module fixtures such as a Ray instance stay on one
# worker), in the order tests/conftest.py gives the files: the longest first.
test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder
