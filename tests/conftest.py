"""Fixtures and hooks of the whole suite; the tiny model families are in ``families/``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from families.llava import build_tiny_llava, tiny_llava_processor
from transformers import LlavaForConditionalGeneration


@pytest.fixture(scope="session")
def tiny_llava() -> LlavaForConditionalGeneration:
    return build_tiny_llava()


@pytest.fixture(scope="session")
def tiny_llava_folder(tmp_path_factory):
    """A tiny LLaVA saved as a Hugging Face folder: config, safetensors, tokenizer, processor."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    build_tiny_llava().save_pretrained(folder)
    tiny_llava_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sample_image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "scene.png"
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (48, 48, 3), generator=generator, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


# -- the vLLM plug-in's tests (tests/vllm_plugin/) ---------------------------------------------
# They run in the vLLM environment (`make vllm-test`) and are skipped wherever vLLM is not
# installed (the main environment, `make test`).
VLLM_TESTS = Path(__file__).parent / "vllm_plugin"
_VLLM_SPEC = importlib.util.find_spec("vllm")
VLLM_INSTALLED = _VLLM_SPEC is not None and _VLLM_SPEC.origin is not None


def pytest_collection_modifyitems(config, items):
    if VLLM_INSTALLED:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed here: make vllm-test runs these in .venv-vllm")
    for item in items:
        if VLLM_TESTS in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_vllm_folder(tmp_path_factory) -> Path:
    from scene_llava import FOLDER

    from flashvlm.integrations.vllm.export import export_for_vllm

    return export_for_vllm(FOLDER, tmp_path_factory.mktemp("demo-vllm") / "model")


@pytest.fixture(scope="session")
def tiny_qwen_vllm(tmp_path_factory) -> dict:
    """The tiny random Qwen2.5-VL the server, cache and settings tests serve (tests/vllm_plugin/tiny_qwen.py)."""
    from tiny_qwen import tiny_qwen

    return tiny_qwen(tmp_path_factory.mktemp("qwen-vllm"), "Qwen2.5-VL")


def pytest_sessionfinish(session):
    """Under pytest-xdist (`make vllm-test`), a worker hands its swap counts to the controller."""
    from agreement import SWAPS

    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["swaps"] = json.dumps(SWAPS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """The controller gathers each worker's swap counts (a hook of pytest-xdist's, where installed)."""
    from agreement import SWAPS

    SWAPS.extend(tuple(entry) for entry in json.loads(getattr(node, "workeroutput", {}).get("swaps", "[]")))


def pytest_terminal_summary(terminalreporter):
    """How many kept tokens differed between two paths on a near-tie (tests/agreement.py)."""
    from agreement import SWAPS

    if SWAPS:
        swapped = [entry for entry in SWAPS if entry[1]]
        total = sum(kept for _, _, kept in SWAPS)
        terminalreporter.write_line(
            f"cross-path selections: {len(SWAPS)} compared, {len(swapped)} with near-tie swaps "
            f"({sum(swaps for _, swaps, _ in swapped)} of {total} kept tokens)"
        )
        for label, swaps, kept in swapped:
            terminalreporter.write_line(f"  {label}: {swaps} of {kept} kept tokens swapped on a near-tie")
