# `make demo` and `make test` each do the whole set-up on a fresh machine; `make install` only sets up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean benchmarks

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[hf,dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/compactml demo -o demo-out

lint: install
	$(BIN)/ruff check compactml tests benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache
