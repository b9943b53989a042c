# `make test` sets up a virtual environment (CPU torch 2.13.0, never a CUDA build, never
# torchvision, lmms-eval without its torchvision requirement) and runs the whole test
# suite, lmms-eval's end-to-end tests included; `make demo` sets up and runs the demo.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
LMMS_EVAL_VERSION := 0.7.3

.PHONY: setup eval-setup test demo clean performance performance-gpu

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed


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

test: eval-setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/flashvlm demo

# Regenerate docs/performance.md (and docs/bench/*.json). `performance` runs scaled shapes
# that fit a CPU in a few minutes; `performance-gpu` the real 7B shapes in bf16 (one GPU).
BENCH := $(VENV)/bin/flashvlm
performance: setup
	$(BENCH) bench-selection --model llava-1.5-7b --max-seconds 15 --repeats 5 --scale vision_layers=6 width=0.5 --threads 2 \
		--json docs/bench/selection-cpu.json --markdown docs/performance.md
	$(BENCH) bench --model llava-1.5-7b --scale lm_layers=1 vision_layers=2 --methods flashvlm flashvlm:fast_diversity \
		--budgets 64 --repeats 3 --new-tokens 4 --threads 2 --json docs/bench/prefill-cpu-full-width.json --markdown docs/performance.md
	$(BENCH) bench --model llava-1.5-7b --scale cpu --budgets 64 128 192 --repeats 3 --new-tokens 8 --threads 2 \
		--json docs/bench/prefill-cpu-scaled.json --markdown docs/performance.md

performance-gpu: setup
	$(BENCH) bench-selection --model llava-1.5-7b --device cuda --dtype bfloat16 --repeats 20 --warmup 3 --max-seconds 60 \
		--json docs/bench/selection-gpu.json --markdown docs/performance.md
	for model in llava-1.5-7b llava-1.5-13b llava-next-7b qwen2.5-vl-7b; do \
		$(BENCH) bench --model $$model --device cuda --dtype bfloat16 --budgets 64 128 192 --repeats 10 --warmup 3 \
			--new-tokens 32 --json docs/bench/prefill-gpu-$$model.json --markdown docs/performance.md || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
