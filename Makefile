# dllab: the two commands of the README, each complete on a fresh machine.
#   make demo   install into .venv and run the main job on bundled data
#   make test   install what the tests need and run them (what CI runs, with test-oldest)
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
# the torch pair this project is developed with, and the oldest pair pyproject admits (both tested in CI)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
OLDEST_PINS ?= torch==2.4.1 torchvision==0.19.1
OLDEST_VENV ?= .venv-oldest
# make gpu-check and readme-results run where the project's venv may not exist (a GPU machine's own
# torch, a clone): they use its python when there is one and install nothing
GPU_PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,$(PYTHON))
SOAK ?= 20

.PHONY: demo test test-all test-oldest test-distributed-soak gpu-check system-deps install install-dev bench clean readme-results

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e . $(TORCH_PINS)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]' $(TORCH_PINS)
	touch $@

# the oldest declared torch/torchvision in a venv of its own (the pins stay through the extras)
$(OLDEST_VENV)/.installed-dev: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/pip install -q $(OLDEST_PINS)
	$(OLDEST_VENV)/bin/pip install -q -e '.[dev]' $(OLDEST_PINS)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Debian packages the tests use: chromium (report screenshots) and the real Fashion-MNIST files.
system-deps:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  if ! command -v chromium >/dev/null || [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium dataset-fashion-mnist >/dev/null; \
	  fi; \
	else echo "note: not root or no apt-get: install chromium and dataset-fashion-mnist yourself for the full test suite"; fi

demo: install
	$(VENV)/bin/dllab demo

test: system-deps install-dev
	$(VENV)/bin/python -m pytest -q

test-all: system-deps install-dev
	$(VENV)/bin/python -m pytest -q -m ""

# the default suite against the oldest declared torch (DLLAB_AUTO_PRECISION passes through), but for
# the benchmark scripts' tests: those scripts are not the package pyproject declares, and their
# figures are measured on the project's pair (this keeps CI's two suites inside its 30 minutes)
test-oldest: system-deps $(OLDEST_VENV)/.installed-dev
	$(OLDEST_VENV)/bin/python -m pytest -q --ignore=tests/test_benchmarks.py

# the torchrun tests SOAK times in a row; stops at the first failure, which names torchrun's exit code
test-distributed-soak: install-dev
	@for i in $$(seq 1 $(SOAK)); do \
	  $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_distributed.py >/tmp/dllab-soak.log 2>&1 \
	    && echo "soak $$i/$(SOAK): ok ($$(tail -n 1 /tmp/dllab-soak.log))" \
	    || { cat /tmp/dllab-soak.log; echo "soak $$i/$(SOAK): FAILED"; exit 1; }; \
	done

# on a machine with a CUDA GPU: cuda-marked tests, layer and trainer benchmarks, three real runs; one table
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

# after `dllab reproduce STUDY ...`: record each study's results.json in docs/results and regenerate
# README's claims and results tables from them (tests/test_claims.py keeps them equal)
REPRODUCE_OUT ?= runs/reproduce
readme-results:
	$(GPU_PYTHON) -c "from pathlib import Path; from dllab.reproduce import update_readme; \
	print('regenerated:', ', '.join(update_readme(Path('README.md'), Path('docs/results'), Path('$(REPRODUCE_OUT)'))))"

bench: install
	$(VENV)/bin/python benchmarks/layers.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build src/*.egg-info .pytest_cache
