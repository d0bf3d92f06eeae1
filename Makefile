# lesionflow: two commands do everything.
#   make run   install, pull the data, run the retraining pipeline on the default data
#   make test  install, pull the data, lint (ruff), run the test suite
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

# Nothing to export: every entry point (lesionflow, python -m pipeline.*, python -m flows.*) finds
# the project root, its BentoML/Prefect homes under .lesionflow/ and the offline settings itself
# (pipeline/core/project.py). `dvc pull` below is offline-quiet through .dvc/config (analytics false).

.PHONY: run test lint format install data browser labelstudio

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

# The browser tests drive Debian's Chromium (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null || { \
		echo "Installing Debian's chromium for the browser tests"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium >/dev/null; }

# Label Studio, as its own server in its own environment (it does not install beside
# constraints.txt): the pinned lock, and a migrated SQLite template with a local admin and an API
# token (template/token), which the end-to-end test copies and starts on 127.0.0.1 (docs/labels.md).
LS_VENV ?= .venv-labelstudio
$(LS_VENV)/.installed: requirements-labelstudio.txt
	@test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q --upgrade pip
	$(LS_VENV)/bin/python -m pip install -q -r requirements-labelstudio.txt
	rm -rf $(LS_VENV)/template && mkdir -p $(LS_VENV)/template && chmod 700 $(LS_VENV)/template
	$(LS_VENV)/bin/python -c 'import secrets; print(secrets.token_hex(20))' > $(LS_VENV)/template/token
	cd $(LS_VENV)/template && ../bin/label-studio init --no-browser --data-dir data \
		--username admin@lesionflow.invalid --password "$$(head -c 24 /dev/urandom | base64)" \
		--user-token "$$(cat token)" --enable-legacy-api-token >init.log 2>&1 || { tail -20 init.log; exit 1; }
	@touch $@

labelstudio: $(LS_VENV)/.installed

# Pull the DVC-tracked data when it is not in the workspace yet.
data: install
	@if [ ! -f data/HAM10000_metadata.csv ] || [ ! -d data/images ]; then \
		echo "Pulling data/ with DVC from the default remote"; $(VENV)/bin/dvc pull data.dvc; \
	fi

run: data
	$(VENV)/bin/lesionflow run

# Ruff (pyproject.toml [tool.ruff]): lint and format check; `make format` rewrites in place.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Two pytest workers (tests/conftest.py keeps what shares a fixture on one), then the timing
# comparisons alone; `pytest` by itself runs everything in one process.
test: lint data browser labelstudio
	$(PY) -m pytest -n 2 -m "not serial"
	$(PY) -m pytest -m serial
