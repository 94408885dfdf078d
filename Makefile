# `make setup` is idempotent: it only reinstalls when pyproject.toml or the constraints change.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m progrow_ray.pipeline

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
