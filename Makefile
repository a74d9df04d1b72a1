# The two entry points of the README: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test lint typecheck layers unit bench browser-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(STAMP_RUN)

# A node in the foreground with the embedded defaults: home in the user data dir, UDP 7337.
run: $(STAMP_RUN)
	$(BIN)/p2pfs daemon

lint: $(STAMP_TEST)
	$(BIN)/ruff check p2pfs benchmarks tests simulations protocol
	$(BIN)/ruff format --check p2pfs benchmarks tests simulations protocol

typecheck: $(STAMP_TEST)
	$(BIN)/mypy

layers: $(STAMP_TEST)
	$(BIN)/lint-imports

# On every core: most of the suite's time is daemons waiting on each other (one core busy
# 0.6 of the wall time); each test has its own homes, ports, LAN port and namespaces.
unit: $(STAMP_TEST)
	$(BIN)/python -m pytest -n auto --dist worksteal --durations=15

test: lint typecheck layers unit

# The web UI in headless Chromium (tests/test_api_browser.py): Playwright from PyPI, the
# browser from the system (apt-get install chromium); screenshots in build/artifacts/.
browser-test: $(STAMP_TEST)
	$(BIN)/python -m pip install --quiet -e '.[test,browser]'
	P2PFS_TEST_ARTIFACTS=build/artifacts $(BIN)/python -m pytest tests/test_api_browser.py -v

bench: $(STAMP_RUN)
	$(BIN)/python -m benchmarks index

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
