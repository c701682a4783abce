# `make demo` and `make test` create and reuse .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; on a machine with its own torch build, override: make TORCH_SPEC=torch test
TORCH_SPEC ?= torch==2.13.0
# One stamp per torch spec: a different TORCH_SPEC (or a newer pyproject.toml) reinstalls.
SPEC_ID := $(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d ' ' -f 1)
STAMP := $(VENV)/.installed-$(SPEC_ID)

.PHONY: demo test lint format bench clean

# torchcfm (the flow-matching parity peer) goes in without its declared dependencies: they pull torchdyn,
# lightning and torchvision, which would replace the pinned torch; the modules the tests import need only
# torch, numpy and pot (a test extra).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "torchcfm==1.0.7"
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/notelab reproduce --quick

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

test: lint
	$(PY) -m pytest -n 2 -q tests

clean:
	rm -rf $(VENV) reports runs
