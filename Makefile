# certmon — the commands a newcomer needs. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DURATION ?= 0

.PHONY: help venv install lint test bench demo deb clean

help:
	@echo "make demo    # run a local demo fleet (broker, collector, agents) and print the dashboard URL"
	@echo "make test    # set up .venv, install certmon non-editable, lint, type-check and run the suite"
	@echo "make lint    # ruff + mypy --strict"
	@echo "make bench   # print the benchmark figures (see bench/README.md)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

# Non-editable on purpose: the suite then runs against what `pip install .` really
# ships, so a missing package-data entry fails here and not on a gateway.
install: $(PY)
	$(PIP) install -q --force-reinstall --no-deps .
	$(PIP) install -q ".[collector,test]"

lint: install
	$(VENV)/bin/ruff check certmon agent collector tests bench
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

bench: install
	$(PY) bench/run_all.py

demo: install
	$(PY) -m collector.demo --duration $(DURATION)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
