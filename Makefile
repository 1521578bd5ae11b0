# The verbs of the project. Everything runs in .venv (made on first use); no Docker unless named.
#   make predict TASK=task2_cpu_organs IN=dir OUT=dir   run a task's predict.sh locally
#   make test                                           all tests (what CI runs)
#   make bench                                          Task 2 speed/memory figures
#   make demo-weights                                   train and export the bundled demo models

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NNUNET_VENV := .venv-nnunet
TASK ?= task2_cpu_organs
IN ?= tests/data/inputs
OUT ?= outputs/$(TASK)

.PHONY: venv nnunet-env test lint predict bench demo-weights clean

venv: $(VENV)/.done
$(VENV)/.done: common/pyproject.toml common/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk; an unpinned resolve would fetch a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps dynamic-network-architectures==0.4.4
	$(PY) -m pip install -q -c common/constraints.txt -e 'common[torch,quantize,dev]'
	touch $@

# nnU-Net v2 itself, test-only, in its own environment (parity tests and benchmarks).
nnunet-env: $(NNUNET_VENV)/.done
$(NNUNET_VENV)/.done: tests/reference/make_nnunet_env.sh tests/reference/requirements-nnunet.txt
	bash tests/reference/make_nnunet_env.sh $(NNUNET_VENV)
	touch $@

lint: venv
	$(VENV)/bin/ruff check --config common/pyproject.toml common tests

test: venv nnunet-env lint
	$(PY) -m pytest -q tests

predict: venv
	@test -d "$(TASK)" || { echo "no task folder $(TASK)"; exit 2; }
	mkdir -p "$(OUT)"
	INPUT_DIR="$(abspath $(IN))" OUTPUT_DIR="$(abspath $(OUT))" PATH="$(abspath $(VENV))/bin:$$PATH" sh $(TASK)/predict.sh

bench: venv nnunet-env
	$(PY) -m tests.bench.task2 $(BENCH_ARGS)

clean:
	rm -rf outputs .pytest_cache .ruff_cache
