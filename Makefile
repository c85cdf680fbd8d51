# Two entry points for a fresh machine (see README): `make run` and `make test`.
# Both create .venv on first use. torch is installed by pip, pinned, first: pip
# takes the CPU wheel available locally, where an unpinned torch (or uv/poetry)
# would pull gigabytes of CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: run test serve venv clean help

help:
	@echo "make run   - install into $(VENV) and run the whole pipeline on the built-in default (dvc repro)"
	@echo "make test  - install into $(VENV) and run the test suite (what CI runs)"
	@echo "make serve - start a local Prefect server and serve unlearn/tofu, unlearn/muse, unlearn/requests"
	@echo "make clean - remove generated data, models, caches and reports of both pipelines (keeps $(VENV))"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/dvc repro
	$(BIN)/unlearn summary

# One torch thread: CPU float sums then run in one order, so the trained tiny models (and their forget
# quality, a KS p-value that moves by 10x between thread counts on the default) are the same on every run.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -ra --durations=15

serve: $(STAMP)
	BIN=$(BIN) flows/serve.sh

clean:
	rm -rf data/tofu models cache reports outputs mlruns mlflow.db .prefect muse/data muse/models muse/cache muse/reports
