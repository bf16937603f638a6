# The README's commands. Torch is installed first and pinned: an unpinned torch pulls several GB
# of CUDA wheels; on a CUDA machine override it, e.g. `make install TORCH=torch==2.11.0`.
PY      ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
LOCK    ?= requirements/lock.txt
BIN      = $(VENV)/bin
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: install lock train test lint format bench clean docker-test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Everything but torch comes at the versions of $(LOCK), the set the suite last passed with.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml $(LOCK)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Re-resolve the dependencies (newest releases within setup.cfg's ranges) in a throw-away venv
# and write them to $(LOCK). Run `make test` before committing the new lock.
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PY) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/pip" install -q --upgrade pip && \
	"$$tmp/venv/bin/pip" install -q "$(TORCH)" && \
	"$$tmp/venv/bin/pip" install -q -e ".[dev]" && \
	{ sed -n '/^#/p' $(LOCK) 2>/dev/null; \
	  "$$tmp/venv/bin/pip" freeze --exclude-editable | grep -iv '^torch=='; } > "$$tmp/lock.txt" && \
	mv "$$tmp/lock.txt" $(LOCK) && \
	echo "wrote $(LOCK): now run make test, and commit it only if the suite passes"

train: install
	$(BIN)/python -m framework.train $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check framework tests bench
	$(BIN)/ruff format --check framework tests bench
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format framework tests bench
	$(BIN)/ruff check --fix framework tests bench

bench: install
	$(BIN)/python bench/data_loader.py
	$(BIN)/python bench/throughput.py

# Build docker/Dockerfile with buildah on a locally made base and train zero2 inside it as uid
# 1000 (needs root; 14-20 min here, so it is not part of `make test` or .ci/run): docker/README.md.
docker-test:
	bash docker/test.sh

clean:
	rm -rf $(VENV) build *.egg-info
