# `make demo` and `make test` each do the whole set-up on a fresh machine; `make install` only sets up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch (the plain PyPI wheel on Linux pulls several GB of CUDA libraries).
# On macOS use: make install TORCH_SPEC=torch==2.13.0
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install test demo lint clean benchmarks

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --retries 1 --extra-index-url $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[hf,dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/compactml demo -o demo-out

benchmarks: install
	$(BIN)/pip install --quiet -c constraints.txt -e ".[hf,dev,bench]"
	$(BIN)/python benchmarks/baselines.py

lint: install
	$(BIN)/ruff check compactml tests benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
