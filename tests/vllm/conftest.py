"""Tests of the vLLM plug-in: they run in the vLLM environment (``make vllm-test``) and are
skipped wherever vLLM is not installed (the main environment, ``make test``).

This folder has no ``__init__.py`` on purpose: a package named ``vllm`` would shadow vLLM.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).parent
# tests/ is on sys.path, so this folder is itself a namespace package named vllm (no origin).
_VLLM_SPEC = importlib.util.find_spec("vllm")
VLLM_INSTALLED = _VLLM_SPEC is not None and _VLLM_SPEC.origin is not None


def pytest_collection_modifyitems(config, items):
    if VLLM_INSTALLED:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed here: make vllm-test runs these in .venv-vllm")
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_vllm_folder(tmp_path_factory) -> Path:
    from flashvlm.integrations.vllm.demo import export_demo_model

    return export_demo_model(tmp_path_factory.mktemp("demo-vllm") / "model")
