# certmon — the commands a newcomer needs. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DURATION ?= 0

.PHONY: help venv install lint test test-arm64 test-armhf bench demo deb deb-arm64 clean mosquitto

help:
	@echo "make demo    # run a local demo fleet (broker, collector, agents) and print the dashboard URL"
	@echo "make test    # set up .venv, install certmon non-editable, lint, type-check and run the suite"
	@echo "make lint    # ruff + mypy --strict"
	@echo "make test-arm64 / test-armhf  # the ARM agent .deb in a Debian 12 root under qemu (root; docs/arm.md)"
	@echo "make bench   # print the benchmark figures (see bench/README.md)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

# Non-editable on purpose: the suite then runs against what `pip install .` really
# ships, so a missing package-data entry fails here and not on a gateway.
install: $(PY)
	$(PIP) install -q --force-reinstall --no-deps .
	$(PIP) install -q ".[collector,test,pkcs11]"

lint: install
	$(VENV)/bin/ruff check certmon agent collector scanner tests bench
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

bench: install
	$(PY) bench/run_all.py

# The demo needs a mosquitto binary (not a running service: it starts its own on a
# free loopback port). Installed with apt-get when missing and we are root.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q mosquitto; \
	    else echo "make: mosquitto is missing: sudo apt-get install mosquitto" >&2; exit 1; fi; }

demo: mosquitto install
	$(PY) bench/demo.py --duration $(DURATION) $(DEMO_ARGS)

# Debian packages into dist/ (docs/packaging.md): a self-contained venv per package.
deb: $(PY)
	$(PY) packaging/build_deb.py --out dist

deb-arm64: $(PY)
	$(PY) packaging/build_deb.py --arch arm64 --out dist

# The ARM agent .deb installed in a Debian 12 root of its architecture and run under
# qemu-user against a real broker and collector (tests/test_arm.py, docs/arm.md). Needs
# root, debootstrap, qemu-user-static; the roots are cached in build/foreign-roots.
test-arm64: install
	$(VENV)/bin/pytest -m arm -k arm64 -s tests/test_arm.py

test-armhf: install
	$(VENV)/bin/pytest -m arm -k armhf -s tests/test_arm.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
