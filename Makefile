# Two commands on a fresh machine: `make demo` and `make test`.
# Everything they need (virtual environment, Python packages, buf) is set up here.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
STAMP := $(VENV)/.installed
# Hand-written packages beside the SDK (generated code is excluded in pyproject).
SERVER_PKGS := $(wildcard reference_server/collateral_sync_reference conformance/collateral_sync_conformance benchmarks/collateral_sync_benchmarks)

.PHONY: setup gen gen-check lint typecheck test test-fast demo bench mutation clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

$(BUF): package.json package-lock.json
	npm install --no-audit --no-fund --loglevel=error
	touch $(BUF)

setup: $(STAMP) $(BUF)

## gen: regenerate Python code and .pyi stubs from proto/
gen: $(STAMP)
	$(PY) scripts/gen_proto.py

gen-check: $(STAMP)
	$(PY) scripts/gen_proto.py --check

## lint: buf lint, ruff, mypy --strict on hand-written code
lint: setup
	cd proto && ../$(BUF) lint
	$(VENV)/bin/ruff check sdk tests scripts $(SERVER_PKGS)
	$(VENV)/bin/mypy sdk/collateral_sync scripts $(SERVER_PKGS)

test: setup gen-check lint
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -x -m "not slow"

demo: $(STAMP)
	$(PY) -m collateral_sync_reference.demo

bench: $(STAMP)
	$(VENV)/bin/collateral-sync bench sdk
	$(VENV)/bin/collateral-sync bench sync
	$(VENV)/bin/collateral-sync bench recon

## mutation: the kit's mutation score over the reference servers' rule modules.
## Outside CI: about ten seconds a mutant, some hundreds of mutants a family.
mutation: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[mutation]'
	$(PY) scripts/mutation.py --family custodian
	$(PY) scripts/mutation.py --family exchange

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis
