# dllab: the two commands of the README, each complete on a fresh machine.
#   make demo   install into .venv and run the main job on bundled data
#   make test   install what the tests need and run them (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
# the torch pair this project is tested with; any torch>=2.4 in pyproject's range works
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-all system-deps install install-dev bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
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

bench: install
	$(VENV)/bin/python benchmarks/layers.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
