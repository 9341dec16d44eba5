# Two entry points: `make quickstart` (set up + run the whole pipeline on simulated data)
# and `make test` (lint, types, tests). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test install lint clean

quickstart: $(STAMP)
	$(BIN)/propensity quickstart

test: $(STAMP) lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src/propensity

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e ".[test,redis,spark]"
	touch $(STAMP)

clean:
	rm -rf data $(VENV)
