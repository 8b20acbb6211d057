# The README commands: `make run` (install + run on the bundled sample),
# `make test`, `make test-fast` and `make bench`. Everything runs inside .venv, created on first use.
# The two test loops are described in docs/development.md.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1

.PHONY: install run test test-all test-fast bench lint lock clean

install: $(VENV)/.installed

# constraints.txt pins every package (an unpinned resolve takes ~14 minutes);
# torch==2.13.0 resolves to the local CPU wheel where one is on pip's find-links.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off -c constraints.txt -e ".[dev]" 2>&1 \
		| grep -v "is ignored: it is neither a file nor a directory" || true
	$(BIN)/python -c "import muco_flow, torch, transformers, deepspeed, kedro, mlflow, dvc, boto3"
	touch $@

run: install
	$(BIN)/kedro run

# The MLflow UI test drives Debian's Chromium (Playwright's own browser download
# cannot work offline).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium

# The whole suite: lint, types, every test (the slow ones too: pipelines, servers, the browser).
test: install $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

# The suite and its opt-in tiers (tests/conftest.py OPT_IN_TIERS): every family at real width, the default
# run at full size; about 15 minutes more than `make test`.
test-all: install $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest --every-family --full-size

# The loop to run while editing: the same lint and types, and only the tests not marked slow
# (nothing that starts a process, a server, a browser or a pipeline run), so no Chromium.
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -m "not slow"

# All benchmarks (9.2 minutes on 2 cores at the last full run, before mining_memory and backbone_cpu were added:
# docs/performance.md, "Command:"; backbone_cpu builds the released 2B-class backbones at full width and needs
# about 16 GB free), on the bundled sample and the tiny backbone (built first if missing); JSON and report.md in
# data/08_reporting/benchmarks/, the tables copied into docs/performance.md.
bench: install
	test -f data/01_raw/m3t_mini/M3T_train/M3T.parquet || $(BIN)/kedro run --pipelines=sample
	test -f data/06_models/tiny-qwen2-vl/config.json || $(BIN)/kedro run --pipelines=backbone
	DS_ACCELERATOR=cpu $(BIN)/python -m benchmarks --update-docs

lint: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerates constraints.txt from pyproject.toml (seconds, with uv).
lock:
	$(PYTHON) -m pip install -q uv
	$(PYTHON) -m uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --find-links /opt/wheels -c constraints.in --no-header --no-annotate -o constraints.txt
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' constraints.txt

clean:
	rm -rf $(VENV)
