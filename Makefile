# `make test` sets up a virtual environment (CPU torch 2.13.0, never a CUDA build, never
# torchvision) and runs the test suite; `make demo` sets up and runs the demo.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/flashvlm demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
