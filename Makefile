# Two commands on a fresh machine: `make demo` and `make test`.
# Everything they need (virtual environment, Python packages, buf; as root, Debian's chromium
# for the HTML report's browser test) is set up here.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
TS_SDK := sdk/typescript
TS_STAMP := $(TS_SDK)/node_modules/.installed
# The protocol as last released: `buf breaking` compares proto/ with it (make release-proto).
RELEASED_PROTO := releases/collateral_sync.v1.json
STAMP := $(VENV)/.installed
# Hand-written packages beside the SDK (generated code is excluded in pyproject).
SERVER_PKGS := $(wildcard reference_server/collateral_sync_reference conformance/collateral_sync_conformance benchmarks/collateral_sync_benchmarks)

.PHONY: setup setup-chromium setup-postgresql setup-prometheus setup-softhsm2 gen gen-check lint typecheck test test-fast test-typescript demo bench mutation release-proto clean

# Each step says what it does; pip names each package as it goes (no minute of silence).
$(STAMP): pyproject.toml constraints.txt
	@echo "setup: virtual environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "setup: upgrading pip in $(VENV)"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "setup: installing the project and its dev tools, pinned by constraints.txt"
	$(PY) -m pip install --progress-bar off -c constraints.txt -e '.[dev]'
	touch $(STAMP)

$(BUF): package.json package-lock.json
	@echo "setup: installing buf from the npm registry (package-lock.json)"
	npm install --no-audit --no-fund --loglevel=error
	touch $(BUF)

$(TS_STAMP): $(TS_SDK)/package.json $(TS_SDK)/package-lock.json
	@echo "setup: installing the TypeScript SDK's dependencies from the npm registry ($(TS_SDK)/package-lock.json)"
	npm ci --prefix $(TS_SDK) --no-audit --no-fund --loglevel=error
	touch $(TS_STAMP)

setup: $(STAMP) $(BUF) $(TS_STAMP) setup-chromium setup-postgresql setup-prometheus setup-softhsm2

## setup-postgresql: Debian's PostgreSQL server (initdb, pg_ctl), which the storage tests start
## in a temporary directory of their own (tests/_postgres.py). Installed with apt-get when
## missing and we are root; otherwise says what to do.
setup-postgresql:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "setup: installing Debian's PostgreSQL for the storage tests: apt-get install -y postgresql"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }; \
	else \
		echo "setup: PostgreSQL's initdb is missing; as root run: apt-get install -y postgresql" \
			"(the PostgreSQL storage tests fail without it)"; \
	fi

## setup-softhsm2: Debian's SoftHSM2, a PKCS#11 token in software, which the signing tests
## use as an HSM (tests/_softhsm.py initialises a token of their own in a temporary directory).
## Installed with apt-get when missing and we are root; otherwise says what to do.
setup-softhsm2:
	@if command -v softhsm2-util >/dev/null 2>&1 && [ -f /usr/lib/softhsm/libsofthsm2.so ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "setup: installing Debian's SoftHSM2 for the PKCS#11 signing tests: apt-get install -y softhsm2"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y softhsm2 \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y softhsm2; }; \
	else \
		echo "setup: SoftHSM2 is missing; as root run: apt-get install -y softhsm2" \
			"(the PKCS#11 signing tests are skipped without it)"; \
	fi

## setup-prometheus: Debian's prometheus, for its promtool: the test that checks the
## scrape config and alert rules in docs/ops/ and runs their rule tests. Installed with
## apt-get when missing and we are root; otherwise says what to do (that test is skipped).
setup-prometheus:
	@if command -v promtool >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "setup: installing Debian's prometheus for promtool: apt-get install -y --no-install-recommends prometheus"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; } \
		|| echo "setup: prometheus could not be installed; the alert rules test will be skipped"; \
	else \
		echo "setup: promtool is missing; as root run: apt-get install -y prometheus" \
			"(the alert rules test is skipped without it)"; \
	fi

## setup-chromium: Debian's chromium, for the HTML report's browser test
## (tests/conformance/test_kit_report_browser.py). Installed with apt-get when
## missing and we are root; otherwise says what to do (the test fails without it).
setup-chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "setup: installing Debian's chromium for the report's browser test: apt-get install -y chromium"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }; \
	else \
		echo "setup: /usr/bin/chromium is missing; as root run: apt-get install -y chromium" \
			"(tests/conformance/test_kit_report_browser.py fails without it)"; \
	fi

## gen: regenerate the Python SDK's code and .pyi stubs and the TypeScript SDK's code from proto/
gen: $(STAMP) $(BUF) $(TS_STAMP)
	$(PY) scripts/gen_proto.py

gen-check: $(STAMP) $(BUF) $(TS_STAMP)
	$(PY) scripts/gen_proto.py --check

## lint: buf lint, ruff, mypy --strict on hand-written code
lint: setup
	cd proto && ../$(BUF) lint
	@echo "lint: buf breaking against the released protocol ($(RELEASED_PROTO))"
	$(BUF) breaking proto --against $(RELEASED_PROTO)
	$(VENV)/bin/ruff check sdk tests scripts $(SERVER_PKGS)
	$(VENV)/bin/mypy sdk/collateral_sync scripts $(SERVER_PKGS)

# The storage tests once more with every reference server on PostgreSQL (tests/conftest.py):
# the reference servers' own tests, crash recovery included, and the kit against each role.
PG_TESTS := tests/reference tests/conformance/test_kit_reference.py \
	tests/conformance/test_kit_exchange.py tests/conformance/test_kit_regulator.py

test: setup gen-check lint test-typescript
	$(VENV)/bin/pytest -q
	@echo "test: the storage tests again, every reference server on PostgreSQL"
	COLLATERAL_SYNC_TEST_STORAGE=postgresql $(VENV)/bin/pytest -q $(PG_TESTS)

## test-typescript: strict tsc over the TypeScript SDK, then its tests with node's test runner
test-typescript: $(TS_STAMP)
	cd $(TS_SDK) && npm test --silent

## release-proto: record proto/ as the released protocol that `buf breaking` guards.
## Run it when a protocol version is released, never to silence a breaking change.
release-proto: $(BUF)
	$(BUF) build proto --exclude-source-info -o $(RELEASED_PROTO)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -x -m "not slow"

demo: $(STAMP)
	$(PY) -m collateral_sync_reference.demo $(DEMO_ARGS)

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
