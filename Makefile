# The README's two commands:  `make train` (the main job)  and  `make test` (the test suite).
# Each creates .venv and installs what it needs on a fresh machine first.
VENV        ?= .venv
PY          := $(VENV)/bin/python
NPROC       ?= 2
CONFIG      ?= experiments/digits.yaml
ARGS        ?= --overwrite
PYTEST_ARGS ?=
# pytest-xdist workers: tests spread over both cores (0: one process, in order)
PYTEST_WORKERS ?= 2
# Pinned for this CPU machine; on a machine with its own torch (e.g. the GPU image's 2.11),
# `make TORCH_SPEC= ...` keeps that one (the package accepts torch>=2.4).
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1

SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c
QUIET_PIP   := sed '/^WARNING: Location/d'   # this machine's local-wheel index warns once per package

.PHONY: setup train test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install -q $(TORCH_SPEC) 2>&1 | $(QUIET_PIP))
	$(PY) -m pip install -q -e '.[dev,mpi,viz,timm,integrations]' 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, torchvision, fastnet, sklearn, yaml, tqdm, pydantic_settings, pytest, xdist, hypothesis, mpi4py, tensorboard, timm, lightning, accelerate"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m fastnet.train --config $(CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
