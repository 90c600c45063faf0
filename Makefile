# Everything runs from a local virtualenv that the targets create on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

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

test-fast: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest -q $(PYTEST_PARALLEL) $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples

## layer overhead benchmark (step time and memory vs. plain fine-tuning)
bench: $(STAMP)
	$(PY) benchmarks/layer_overhead.py $(ARGS)

clean:
	rm -rf $(VENV) .cache outputs .pytest_cache .ruff_cache .gpusite
