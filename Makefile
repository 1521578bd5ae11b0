# The verbs of the project. Everything runs in .venv (made on first use); no Docker unless named.
#   make predict TASK=task2_cpu_organs IN=dir OUT=dir   run a task's predict.sh locally
#   make build TASK=... [CONFIG=config_light.toml]      a task's image (CONFIG: another config of its folder)
#   make test                                           all tests (what CI runs)
#   make bench                                          Task 2 speed/memory figures
#   make bench-train                                    training steps/s per demo network, and its levers
#   make bench-memory                                   memory estimate per case against measured peaks
#   make soak TASK=... RUNS=100                         consecutive container runs, good and bad cases
#   make evaluate TASK=... IN=images GT=labels REPORT=dir   the organisers' evaluation (PRED=dir: score only)
#   make demo-weights                                   train and export the bundled demo models

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NNUNET_VENV := .venv-nnunet
TASK ?= task2_cpu_organs
IN ?= tests/data/inputs
OUT ?= outputs/$(TASK)

.PHONY: venv nnunet-env test lint predict bench bench-train bench-memory soak evaluate demo-weights clean

venv: $(VENV)/.done
$(VENV)/.done: common/pyproject.toml tools/pyproject.toml common/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk; an unpinned resolve would fetch a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps dynamic-network-architectures==0.4.4
	# the runtime (what images install) and the host-side tools beside it, both editable
	$(PY) -m pip install -q -c common/constraints.txt -e 'common[torch]' -e 'tools[dev]'
	touch $@

# nnU-Net v2 itself, test-only, in its own environment (parity tests and benchmarks).
nnunet-env: $(NNUNET_VENV)/.done
$(NNUNET_VENV)/.done: tests/reference/make_nnunet_env.sh tests/reference/requirements-nnunet.txt
	bash tests/reference/make_nnunet_env.sh $(NNUNET_VENV)
	touch $@

lint: venv
	$(VENV)/bin/ruff check --config common/pyproject.toml common tools tests

# The torch-heavy files run in processes of their own: on a 2-core Intel Xeon (AVX-512 BF16/FP16)
# torch segfaulted in the one pytest process after OpenVINO and other torch work had run in it
# (a parity test after the locate tests, a training test late in the suite; each file alone passes).
TORCH_HEAVY := tests/test_training.py tests/test_transfer.py tests/test_parity_nnunet.py
test: venv nnunet-env lint
	$(PY) -m pytest -q tests $(addprefix --ignore=,$(TORCH_HEAVY))
	for f in $(TORCH_HEAVY); do $(PY) -m pytest -q $$f || exit 1; done

predict: venv
	@test -d "$(TASK)" || { echo "no task folder $(TASK)"; exit 2; }
	mkdir -p "$(OUT)"
	INPUT_DIR="$(abspath $(IN))" OUTPUT_DIR="$(abspath $(OUT))" PATH="$(abspath $(VENV))/bin:$$PATH" sh $(TASK)/predict.sh

bench: venv nnunet-env
	$(PY) -m flarebox_tools.bench.task2 $(BENCH_ARGS)

# Training throughput: steps/s of each demo network, trainer against a bare torch loop, and the levers
bench-train: venv
	$(PY) -m flarebox_tools.bench.train $(BENCH_ARGS)

# Consecutive organiser-style container runs over good and bad cases: lost cases, time and memory growth
RUNS ?= 100
soak: engine
	$(PY) -m flarebox_tools.bench.soak --task $(TASK) --runs $(RUNS) --image $(IMAGE)

# The memory budget's estimate (from a case's header) against measured peaks, per task and case kind
bench-memory: venv
	$(PY) -m flarebox_tools.bench.memory $(BENCH_ARGS)

# The organisers' evaluation (tools/src/flarebox_tools/evaluation, host-side): one container run per case with the built
# image, or the local predict path where no engine or image is there (the report says which), timed
# and sampled, then FLARE DSC/NSD per class; cases.csv, summary.md and PNGs in REPORT.
# PRED=dir scores an existing folder of <case>.nii.gz instead of running anything (IN optional then).
REPORT ?= reports/$(TASK)
evaluate: venv
	@test -n "$(GT)" || { echo "GT=folder of reference labels is required"; exit 2; }
	$(PY) -m flarebox_tools.evaluation -t $(TASK) -g "$(GT)" -r "$(REPORT)" \
	  $(if $(PRED),-p "$(PRED)" $(if $(filter command line environment,$(origin IN)),-i "$(IN)"),-i "$(IN)") $(EVAL_ARGS)

clean:
	rm -rf outputs reports .pytest_cache .ruff_cache

# ---- Docker images -------------------------------------------------------------------------
# Images build offline (--network none) from a pinned wheelhouse made on the host. Where no
# registry is reachable the base image is made locally with debootstrap (flarebox-base:bookworm).
TEAM ?= flarebox
TASKS := task1_pancancer task2_cpu_organs task3_mri_transfer
REGISTRY_BASE := python:3.11-slim-bookworm
LOCAL_BASE := flarebox-base:bookworm
BASE_IMAGE ?= $(shell docker image inspect $(REGISTRY_BASE) >/dev/null 2>&1 && echo $(REGISTRY_BASE) || echo $(LOCAL_BASE))
# Torch in the Task 1 and Task 3 images: 'cuda' (the default: PyPI's CUDA build of torch with the
# CUDA libraries it names, pinned in common/requirements/cuda.txt; what the organisers' GPU needs) or
# 'cpu' (torch's CPU build: CPU-only use and quicker builds, tagged :cpu). '===' asks for exactly
# 2.13.0, so no local +cpu build on the machine can stand in for the CUDA one.
TORCH_BUILD ?= cuda
TORCH_cuda := torch===2.13.0 -r common/requirements/cuda.txt
TORCH_cpu := torch==2.13.0+cpu
GPU_TASK = $(filter-out task2_cpu_organs,$(TASK))
IMAGE = $(TEAM)-$(subst _,-,$(TASK)):$(if $(and $(GPU_TASK),$(filter cpu,$(TORCH_BUILD))),cpu,latest)
WHEEL_SET = $(if $(GPU_TASK),gpu-$(TORCH_BUILD),cpu)
GPU_FLAG = $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo '--gpus="device=0"')
MEMORY = $(if $(filter task2_cpu_organs,$(TASK)),8G,28G)

.PHONY: engine base-image wheelhouse packages build build-all run save-all

engine:
	@docker info >/dev/null 2>&1 || { \
	  command -v dockerd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io; }; \
	  (dockerd --bridge=none --iptables=false --ip-masq=false >/tmp/dockerd.log 2>&1 &); \
	  for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
	  docker info >/dev/null 2>&1 || { echo "no Docker engine: see /tmp/dockerd.log"; exit 1; }; }

base-image: engine
	@docker image inspect $(BASE_IMAGE) >/dev/null 2>&1 || { \
	  test "$(BASE_IMAGE)" = "$(LOCAL_BASE)" || { echo "base image $(BASE_IMAGE) missing"; exit 1; }; \
	  command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }; \
	  rootfs=$$(mktemp -d) && \
	  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm $$rootfs \
	    http://deb.debian.org/debian >/tmp/debootstrap.log 2>&1 && \
	  tar -C $$rootfs -c . | docker import - $(LOCAL_BASE) && rm -rf $$rootfs; }

# One folder of third-party wheels per image kind, every package pinned (common/constraints.txt) and
# listed (--no-deps: the lists are the whole closure): cpu = Task 2's OpenVINO set; gpu-cuda and
# gpu-cpu = the torch set with either torch build. Each becomes an image, flarebox-packages:<set>,
# that the task images copy their venv from; the flarebox wheel is built apart (.wheelhouse/flarebox),
# so that a change to flarebox neither downloads nor reinstalls the packages.
define make_wheelhouse
rm -rf .wheelhouse/$(1) && mkdir -p .wheelhouse/$(1)
$(PY) -m pip download -q --no-deps --only-binary=:all: -c common/constraints.txt $(2) -d .wheelhouse/$(1)
touch .wheelhouse/$(1)/.done
endef

wheelhouse: .wheelhouse/cpu/.done .wheelhouse/gpu-$(TORCH_BUILD)/.done .wheelhouse/flarebox/.done
.wheelhouse/cpu/.done: common/constraints.txt common/requirements/cpu.txt | venv
	$(call make_wheelhouse,cpu,-r common/requirements/cpu.txt)
.wheelhouse/gpu-%/.done: common/constraints.txt common/requirements/gpu.txt common/requirements/cuda.txt | venv
	$(call make_wheelhouse,gpu-$*,-r common/requirements/gpu.txt $(TORCH_$*))
.wheelhouse/flarebox/.done: $(shell find common/src -name '*.py') common/pyproject.toml | venv
	rm -rf .wheelhouse/flarebox && mkdir -p .wheelhouse/flarebox
	$(PY) -m pip wheel -q --no-deps --no-build-isolation ./common -w .wheelhouse/flarebox
	touch $@

# flarebox-packages:<set>, built again only when its wheelhouse or its Dockerfile is newer than the
# image (a stamp beside the wheels), so that a pruned build cache costs no reinstall
PACKAGES_STAMP = .wheelhouse/$(WHEEL_SET).image
packages: base-image .wheelhouse/$(WHEEL_SET)/.done
	@if docker image inspect $(TEAM)-packages:$(WHEEL_SET) >/dev/null 2>&1 && test $(PACKAGES_STAMP) -nt \
	    .wheelhouse/$(WHEEL_SET)/.done && test $(PACKAGES_STAMP) -nt common/docker/packages.Dockerfile; then \
	  echo "$(TEAM)-packages:$(WHEEL_SET) is up to date"; else \
	  docker build --network none --build-arg BASE_IMAGE=$(BASE_IMAGE) -f common/docker/packages.Dockerfile \
	    -t $(TEAM)-packages:$(WHEEL_SET) .wheelhouse/$(WHEEL_SET) && touch $(PACKAGES_STAMP); fi

build: packages .wheelhouse/flarebox/.done
	@df -P . | awk 'NR==2 && $$4 < 8*1024*1024 {print "less than 8 GB of free disk: not building"; exit 1}'
	docker build -q --network none --build-arg BASE_IMAGE=$(BASE_IMAGE) -f common/docker/flarebox.Dockerfile \
	  -t $(TEAM)-site:latest .wheelhouse/flarebox
	docker build --network none --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg PACKAGES=$(TEAM)-packages:$(WHEEL_SET) \
	  --build-arg SITE=$(TEAM)-site:latest $(if $(CONFIG),--build-arg CONFIG=$(CONFIG)) -f $(TASK)/Dockerfile -t $(IMAGE) .
	@docker image inspect $(IMAGE) --format '$(IMAGE): {{.Size}} bytes' | awk '{printf "%s %.0f MB\n", $$1, $$2/1e6}'

build-all:
	for t in $(TASKS); do $(MAKE) build TASK=$$t || exit 1; done

# The organisers' command, exactly (GPU only where one exists).
run: engine
	mkdir -p "$(OUT)"
	docker container run --shm-size=28gb -m $(MEMORY) $(GPU_FLAG) --name $(TEAM) --rm \
	  -v $(abspath $(IN))/:/workspace/inputs/ -v $(abspath $(OUT))/:/workspace/outputs/ \
	  $(IMAGE) /bin/bash -c "sh predict.sh"

save-all:
	for t in $(TASKS); do \
	  img=$(TEAM)-$$(echo $$t | tr _ -):latest; mkdir -p dist/$$t; \
	  docker tag $$img $(TEAM):latest && docker save $(TEAM):latest | gzip -1 > dist/$$t/$(TEAM).tar.gz || exit 1; \
	  ls -la dist/$$t/$(TEAM).tar.gz; done

# ---- Demo weights: phantoms -> small networks of the published topologies -> OpenVINO -> scores --------
# Each command keeps its phantoms, cache and checkpoints in .cache/demo/<task>: interrupted (Ctrl-C,
# a killed process, a session's end), the same command goes on from the last checkpoint. Durations
# on a 2-core CPU are in docs/training.md.
demo-weights: venv
	$(PY) -m flarebox_tools.training.demo --task task2 --out task2_cpu_organs/weights/model --work .cache/demo/task2 \
	    --train-cases 60 --config task2_cpu_organs/config.toml
	$(PY) -m flarebox_tools.training.demo --task locator --out task2_cpu_organs/weights/locator --work .cache/demo/locator
	$(PY) -m flarebox_tools.training.demo --task task2-light --out task2_cpu_organs/weights/light --work .cache/demo/task2-light \
	    --train-cases 60 --minutes 30 --config task2_cpu_organs/config_light.toml
	$(PY) -m flarebox_tools.training.demo --task task1 --out task1_pancancer/weights/model --work .cache/demo/task1 \
	    --config task1_pancancer/config.toml
	$(PY) -m flarebox_tools.training.transfer_demo --out task3_mri_transfer/weights/model \
	    --mind-out task3_mri_transfer/weights/mind_model --work .cache/demo/task3
