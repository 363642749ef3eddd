# One command per intent, identical locally and in CI.
#   make demo   — set up (.venv) and run the whole loop on this machine (DEMO_ARGS=--serve keeps it
#                 running, with the console, until Ctrl-C)
#   make test   — set up (system packages for the real broker/database, .venv) and run lint, type check,
#                 import contracts, proto staleness and the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup bytecode system-deps demo test test-socketcan check lint type contracts proto proto-check pytest clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all]'
	@touch $(STAMP)

# Python writes compiled modules only where it may: with PYTHONDONTWRITEBYTECODE set (many containers and
# CI images set it) an editable install's modules are compiled again by every process that imports them,
# about a second of each coordinator's start. Compiled once here (only what changed since), as a wheel's
# install would have; Python still recompiles a module whose source is newer than its cache.
bytecode: setup
	@$(BIN)/python -m compileall -q -j 0 shared agent cloud firmware-sim cli

demo: setup bytecode
	$(BIN)/fleetloop demo $(DEMO_ARGS)

test: system-deps setup check pytest

system-deps:
	@bash scripts/system-deps.sh

check: lint type contracts proto-check

lint: setup
	$(BIN)/ruff check .

type: setup
	$(BIN)/mypy

contracts: setup
	$(BIN)/lint-imports

proto: setup
	$(BIN)/python scripts/gen_proto.py

proto-check: setup
	$(BIN)/python scripts/gen_proto.py --check

# The test files run on two workers (pytest-xdist), one file per worker at a time so a file's module
# fixtures and order hold; much of the suite waits (processes starting, brokers, rollout clocks,
# browsers) rather than computes. Measured on the two-core machine (2026-12-05), before that day's cuts
# to the slowest tests: 1,751 s on two workers against 1,895-2,796 s in one process the days before;
# after them, 1,195 s on two workers. PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= 2

pytest: setup bytecode
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The live CAN source on a kernel SocketCAN interface: needs the vcan module and root (left out of
# `make test`, since containers and CI machines have no vcan).
VCAN ?= vcan0
test-socketcan: setup
	@ip link show $(VCAN) >/dev/null 2>&1 || { ip link add dev $(VCAN) type vcan && ip link set up $(VCAN); }
	FLEETLOOP_VCAN=$(VCAN) $(BIN)/pytest -q tests/agent/test_can_live.py -k socketcan

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
