# fleetvpn: `make demo` and `make test` set up everything from nothing (Debian 12, as root).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: all setup deps venv demo test test-unit lint bench clean

all: test

setup: deps venv

deps:
	PYTHON=$(PYTHON) ./scripts/install-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "fleetvpn needs Python 3.11 or newer ($(PYTHON) is older)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[lab,controller,test]'
	touch $(STAMP)

demo: setup
	./scripts/demo

test: setup lint
	$(BIN)/pytest -q

test-unit: venv
	$(BIN)/pytest -q tests/unit

lint: venv
	$(BIN)/ruff check fleetvpn tests benchmarks ansible_collections
	$(BIN)/ruff format --check fleetvpn tests benchmarks ansible_collections
	$(BIN)/mypy
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/ansible-lint --profile production

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
