# Everything runs from a local virtualenv that the targets create on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install train test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

## the targets and what they do
help:
	@awk '/^## /{doc=substr($$0,4); next} /^[a-z-]+:/{if(doc){sub(/:.*/,"",$$1); printf "  make %-10s %s\n", $$1, doc}; doc=""}' $(MAKEFILE_LIST)

## the virtualenv .venv with the project and its dev tools (the other targets make it on first use)
install: $(STAMP)

## the main job on the built-in default (digits benchmark); ARGS="key=value ..." for overrides
train: $(STAMP)
	$(PY) -m cwps_lightning.train $(ARGS)

# one pytest-xdist worker per core; tests sharing a module fixture run on one worker (loadgroup)
PYTEST_PARALLEL := -n auto --dist loadgroup

## lint, then the whole test suite, slow end-to-end tests included (`make test-fast` skips them)
test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m '' $(ARGS)

## the same without the slow end-to-end tests
test-fast: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q $(PYTEST_PARALLEL) $(ARGS)

## ruff over src, tests, benchmarks and examples
lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples

## layer overhead benchmark (step time and memory vs. plain fine-tuning)
bench: $(STAMP)
	$(PY) benchmarks/layer_overhead.py $(ARGS)

## remove the virtualenv, caches and outputs/
clean:
	rm -rf $(VENV) .cache outputs .pytest_cache .ruff_cache .gpusite
