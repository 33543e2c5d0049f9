# The two quick-start commands: `make up` runs the platform, `make test` runs the tests.
# Both create the virtualenv (.venv) and install the project from its own files first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: up test lint typecheck policy-scan check services clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[triton,dev,models]"
	touch $(STAMP)

services:
	@scripts/ensure-services

up: $(STAMP) services
	$(BIN)/mlp up

# --tests: where only Docker could run a missing service, the tests start it with testcontainers.
test: $(STAMP)
	@scripts/ensure-services --tests
	@scripts/ensure-monitoring
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy platform events projections tests

# checkov (a third-party policy scanner) over every rendered overlay, against k8s/checkov-skips.yaml.
# Its own virtualenv: its pins would downgrade the project's dependencies (.ci/checkov-requirements.txt).
$(CHECKOV_STAMP): .ci/checkov-requirements.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/pip install --quiet -r .ci/checkov-requirements.txt
	touch $(CHECKOV_STAMP)

policy-scan: $(STAMP) $(CHECKOV_STAMP)
	MLP_CHECKOV=$(CHECKOV_VENV)/bin/checkov $(BIN)/python -m tests.k8s.policy_scan

check: lint typecheck policy-scan test

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .mypy_cache .ruff_cache .pytest_cache
