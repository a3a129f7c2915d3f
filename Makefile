# The README's two commands: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test test-slow lint bench bench-tools FORCE

# The service's dependencies alone (make install, make run): a production checkout gets no test tools.
$(BIN)/.installed: pyproject.toml $(VENV)/.interpreter
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable .
	touch $@

# The interpreter .venv was made with; another PYTHON makes it again (helper 138: `make install
# PYTHON=/usr/bin/python3` in a checkout where `make run` had made it kept pyenv's, which the
# service's user may not run).  Written only when it changes: what depends on it stays up to date.
$(VENV)/.interpreter: FORCE
	@interpreter="$$($(PYTHON) -c 'import sys; print(sys.executable)')" && \
	if [ "$$(cat $@ 2>/dev/null)" != "$$interpreter" ]; then \
		rm -rf $(VENV) && mkdir -p $(VENV) && echo "$$interpreter" > $@; \
	fi

# And the tests' and linters' (make test, lint, bench).
$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install --quiet --editable '.[test]'
	touch $@

## Create .venv (once) and compile the package: after every update of a deployed checkout.
## Under the systemd unit the checkout is read-only, and the producers' launcher, started with
## the service and again after any crash, would otherwise compile its program each time
## (what changed since the last run only: compileall skips what is up to date).
install: $(BIN)/.installed
	$(BIN)/python -m compileall -q archiver

## Start the service on the sample storage in data/ (http://localhost:8080/).
run: install
	$(BIN)/archiver --dir data $(ARGS)

## Lint, type-check and run the test suite (slow stress tests skipped), a test file at a time
## on each of five workers: most of a test's time is waiting on servers, clients and timeouts.
## The longest files first (tests/conftest.py).  Bytecode is cached even where the environment
## says not to: every worker would compile the tests, and each of the ~150 services the tests
## start would compile the package, anew (~40 s of the two cores).
test: $(BIN)/.installed-test lint
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -n 5 --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

## The stress and soak tests as well, one at a time (they print figures that a second worker would skew).
test-slow: $(BIN)/.installed-test
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest --run-slow $(PYTEST_ARGS)

lint: $(BIN)/.installed-test
	$(BIN)/ruff check archiver tests
	$(BIN)/ruff format --check archiver tests
	$(BIN)/mypy

## The benchmark: the service against zipstream-ng's zipserver and nginx, in one run (~15 min; ~700 MB in bench-data/).
bench: $(BIN)/.installed-test bench-tools
	$(BIN)/pip install --quiet zipstream-ng  # the peer the service is measured against
	$(BIN)/python -m tests.benchmark $(BENCH_ARGS)

bench-tools:
	@missing=""; \
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || missing="$$missing nginx-light"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v aria2c >/dev/null || missing="$$missing aria2"; \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
