# `make test` sets up a virtual environment (CPU torch 2.13.0, never a CUDA build, never
# torchvision) and runs the test suite; `make demo` sets up and runs the demo.
# `make eval-test` adds lmms-eval to that environment and runs the tests that use it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
LMMS_EVAL_VERSION := 0.7.3

.PHONY: setup test demo clean eval-setup eval-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

# lmms-eval's metadata requires torchvision, whose PyPI build is CUDA-only and breaks the
# CPU torch: install what it needs for image tasks (flashvlm[eval], with torch held at its
# version) and then lmms-eval itself without its dependencies.
$(VENV)/.eval-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,eval]" torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet --no-deps lmms-eval==$(LMMS_EVAL_VERSION)
	$(PY) -c "import lmms_eval.evaluator, flashvlm.integrations.lmms_eval.model"
	$(PY) -c "import importlib.util as u, torch; assert torch.__version__.startswith('$(TORCH_VERSION)') and not u.find_spec('torchvision'), 'torch replaced or torchvision pulled in'"
	touch $@

eval-setup: $(VENV)/.eval-installed

eval-test: eval-setup
	$(PY) -m pytest -q -m lmms_eval

demo: setup
	$(VENV)/bin/flashvlm demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
