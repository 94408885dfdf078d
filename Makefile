# `make setup` is idempotent: it only reinstalls when pyproject.toml or the constraints change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints-cpu.txt)

.PHONY: setup demo lint format test clean

setup: $(STAMP)

# torch: on a machine without an NVIDIA driver, a local CPU wheel (pip's find-links, e.g. /opt/wheels)
# is installed first and the project install keeps it; pip would otherwise back-track to the index's
# multi-GB CUDA build. GPU machines, and machines with no such wheel, get torch from the index.
$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then echo "NVIDIA driver found: torch from the index"; \
	elif $(PY) -m pip install -q --no-index --no-deps "torch==$(TORCH_VERSION)+cpu" 2>/dev/null; then \
	    echo "torch $(TORCH_VERSION)+cpu from a local wheel"; \
	else echo "no local CPU wheel of torch $(TORCH_VERSION): torch from the index"; fi
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m progrow_ray.pipeline

# style and import order (ruff, pinned in the test extra); `make format` rewrites what it can
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
