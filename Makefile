# soupflow: `make run` and `make test` work on a fresh clone (they create .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint install peers bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/soupflow run --workflows workflows --data data

# The real peers the tests talk to (dcmtk's storescu, echoscu, storescp; Orthanc with its
# DICOMweb plugin; chromium for the dashboard; PostgreSQL, from which bench/postgres.py makes a
# throwaway cluster, and haproxy for the cluster test; curl, a STOW-RS client), installed when
# missing and possible (root with apt-get); tests that need a missing peer fail under CI=true
# and skip otherwise.
PEER_PACKAGES := dcmtk orthanc orthanc-dicomweb chromium chromium-driver postgresql haproxy curl
peers:
	@if ! command -v storescu >/dev/null 2>&1 || ! command -v Orthanc >/dev/null 2>&1 \
	    || ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 \
	    || ! command -v pg_ctlcluster >/dev/null 2>&1 || ! command -v haproxy >/dev/null 2>&1 \
	    || ! command -v curl >/dev/null 2>&1 \
	    || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(PEER_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PEER_PACKAGES) >/dev/null; \
	  else echo "$(PEER_PACKAGES): missing and not installable here; their tests skip (fail under CI=true)"; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/soupflow schema --check

# Tests run in TEST_WORKERS processes (pytest-xdist; each test still owns its ports and
# folders, each worker its own PostgreSQL cluster). TEST_WORKERS=0 runs them in this one.
TEST_WORKERS ?= 2
# `soupflow run` starts a worker process by default on more than one core: the runtimes of
# these files run again with their workers as threads of the runtime (`--processes 0`).
IN_PROCESS_TESTS = tests/test_processing.py tests/test_durability.py \
	tests/test_association_reuse.py tests/test_pacing.py tests/test_run.py tests/test_admin.py
test: lint peers
	$(BIN)/python -m pytest -n $(TEST_WORKERS)
	SOUPFLOW_PROCESSES=0 $(BIN)/python -m pytest -n $(TEST_WORKERS) $(IN_PROCESS_TESTS)

# Speed measured side by side with a baseline in one run (see BENCHMARKS.md).
bench: $(STAMP) peers
	$(BIN)/python -m bench.message
	$(BIN)/python -m bench.ingest --runs 2
	$(BIN)/python -m bench.forward --runs 2
	$(BIN)/python -m bench.tls --runs 2
	$(BIN)/python -m bench.stow --runs 2
	$(BIN)/python -m bench.metrics --runs 2
	$(BIN)/python -m bench.queue --runs 2

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
