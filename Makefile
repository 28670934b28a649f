# Two set-up commands for a fresh machine: `make demo` and `make test` (docs/getting-started.md).
# Each creates .venv with the machine's python3 if it is missing and installs
# the project (editable) with pip; torch/torchvision come from local wheels here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Outputs (mlflow.db, mlartifacts/, ray_results/, reports/, run_cache/) go to one root: RAYMANIFOLD_HOME if set,
# else this folder (docs/getting-started.md, "Where output lands").
ROOT   := $(or $(RAYMANIFOLD_HOME),$(CURDIR))

.PHONY: demo test test-all test-slow test-unit test-ray venv mlflow-ui bench serve bench-serve screenshots web-demo bench-web clean distclean

SHELL  := /bin/bash

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing raymanifold and its dependencies into $(VENV) (pip) ..."
	@set -o pipefail; $(PY) -m pip install --quiet -e '.[test]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@set -o pipefail; $(PY) -m pip install --quiet --no-deps 'torchattacks==3.5.1' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raymanifold demo

# test: the fast tier (every test not marked slow; tests/conftest.py lists the slow tier); test-all: the whole
# suite (CI: .ci/run); test-slow: the slow tier alone; test-unit: no Ray; test-ray: only the Ray tier.
# PYTEST_ARGS adds options, e.g. make test PYTEST_ARGS=--durations=15
PYTEST_ARGS ?=
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not slow" $(PYTEST_ARGS) tests

test-ray: $(STAMP)
	$(PY) -m pytest -q -m ray $(PYTEST_ARGS) tests

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(ROOT)/mlflow.db --port 5000

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/scoring_throughput.py

serve: $(STAMP)
	$(VENV)/bin/raymanifold serve

bench-serve: $(STAMP)
	$(PY) benchmarks/serve_latency.py

# the web page (docs/web.md): trains three small models once (cached in reports/web/models), serves them and
# writes screenshots to reports/web/ under the output root; needs chromium (apt-get install chromium).
# To refresh the README's picture as well: make screenshots DOCS_PNG=docs/web_page.png
DOCS_PNG ?=
screenshots: $(STAMP)
	$(PY) -m serve.webdemo screenshots --docs "$(DOCS_PNG)"

web-demo: $(STAMP)
	$(PY) -m serve.webdemo serve --port 8000

bench-web: $(STAMP)
	$(PY) benchmarks/web_page.py

# clean: outputs that runs rebuild (reports, checkpoints, the run cache); the MLflow history stays.
# distclean: also the MLflow history (mlflow.db, mlartifacts/). Neither touches .venv (rm -rf .venv for that).
clean:
	cd "$(ROOT)" && rm -rf reports checkpoints ray_results run_cache

distclean: clean
	cd "$(ROOT)" && rm -rf mlflow.db mlflow.db.lock mlflow.db-journal mlartifacts
