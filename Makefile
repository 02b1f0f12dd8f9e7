# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint bench demo up clean chaos

install: $(STAMP)

# torch first, pinned to the CPU build on this machine's disk (another spec may pull a CUDA build);
# deepspeed without build isolation so that its build sees that torch instead of fetching one.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation "deepspeed>=0.18,<0.20"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

# Every fault scenario against real processes (several minutes); prints the table of figures.
chaos: install
	NEXUSGEN_CHAOS=full $(BIN)/python -m pytest -m chaos -s -q tests/chaos

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench.run_all

demo: install
	$(BIN)/nexusgen demo

up: install
	$(BIN)/nexusgen up

clean:
	rm -rf $(VENV) .nexusgen demo-output
