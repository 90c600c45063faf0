# Everything runs from a local virtualenv that the targets create on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## the main job on the built-in default (digits benchmark); ARGS="key=value ..." for overrides
train: $(STAMP)
	$(PY) -m cwps_lightning.train $(ARGS)

## lint, then the test suite (slow end-to-end tests excluded; `make test-all` includes them)
test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m '' $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

## layer overhead benchmark (step time and memory vs. plain fine-tuning)
bench: $(STAMP)
	$(PY) benchmarks/layer_overhead.py $(ARGS)

clean:
	rm -rf $(VENV) .cache outputs .pytest_cache
