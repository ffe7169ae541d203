.DEFAULT_GOAL := help
PY ?= .venv/bin/python

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

venv: ## Create .venv and install memstream with its test tools
	python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'

lint: ## ruff (lint + format check) and mypy --strict
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: ## Format the code
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: ## Run every test (real Redis servers started by the tests)
	$(PY) -m pytest

test-fast: ## Run the tests without the chaos and cluster suites
	$(PY) -m pytest -m "not chaos and not cluster"

contract: ## Regenerate the committed JSON Schema and conformance vectors
	$(PY) -m events.conformance

docs: ## Regenerate the configuration reference (docs/configuration.md) from the models
	$(PY) -m processors.docgen --write

BENCH_RUN ?= benchmarks/results/$(shell date -u +%Y%m%d-%H%M)-$(shell git rev-parse --short HEAD).json

bench: ## Run every hot-path goal's benchmark, print one table, save the run (benchmarks/README.md)
	$(PY) benchmarks/suite.py --save $(BENCH_RUN) $(BENCH_ARGS)

bench-readme: ## Regenerate the README's Performance table from the newest saved run
	$(PY) benchmarks/readme_table.py --write

bench-append: ## Run the append benchmark alone (see benchmarks/README.md)
	$(PY) benchmarks/append.py

bench-accountant: ## Run the accountant benchmark (see benchmarks/README.md)
	$(PY) benchmarks/accountant.py

bench-waiters: ## Run the concurrent publish(wait=True) benchmark (see benchmarks/README.md)
	$(PY) benchmarks/waiters.py

.PHONY: help venv lint format test test-fast contract docs bench bench-readme bench-append bench-accountant bench-waiters
