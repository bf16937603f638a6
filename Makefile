# The README's commands. Torch is installed first and pinned: an unpinned torch pulls several GB
# of CUDA wheels; on a CUDA machine override it, e.g. `make install TORCH=torch==2.11.0`.
PY      ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
BIN      = $(VENV)/bin
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: install train test lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

train: install
	$(BIN)/python -m framework.train $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check framework tests bench
	$(BIN)/ruff format --check framework tests bench

format: install
	$(BIN)/ruff format framework tests bench
	$(BIN)/ruff check --fix framework tests bench

bench: install
	$(BIN)/python bench/data_loader.py
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
