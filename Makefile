# The two quick-start commands: `make up` runs the platform, `make test` runs the tests.
# Both create the virtualenv (.venv) and install the project from its own files first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint typecheck check services clean

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
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy platform events projections tests

check: lint typecheck test

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
