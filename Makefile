# Set-up and everyday commands. `make run` and `make test` work on a fresh machine.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: install test test-fast lint run bench bench-load screenshots clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	touch $@

test: install
	$(BIN)/python -m pytest -q -ra

# the maintainers' lane: everything but the tests marked slow, ~3 minutes on 2 idle cores (README, Development);
# CI runs `make test`. TEST_CPU_REPORT=30 lists the costliest tests in CPU seconds.
test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

# ruff (rules in pyproject.toml [tool.ruff]), mypy on the engine ([tool.mypy]) and the import contracts;
# tests/test_architecture.py runs the same three in CI
lint: install
	$(BIN)/ruff check audit_service tests benchmarks
	$(BIN)/ruff format --check audit_service/engine
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# docs/report.png and docs/front.png, from the browser tests (needs /usr/bin/chromium: apt-get install chromium)
screenshots: install
	AUDIT_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_browser.py

run: install
	$(BIN)/audit-service serve --host $(HOST) --port $(PORT)

bench: install
	$(BIN)/python benchmarks/bench_sweep.py

bench-load: install
	$(BIN)/python benchmarks/bench_load.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
