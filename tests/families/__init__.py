"""Tiny models of every supported family, built from configs (no download), and inputs for them.

One module per adapter module of ``flashvlm.adapters``, with the same stem: its tiny models,
inputs, processors and ``CASES``. ``shared`` holds what several families use. The tests that
run over every family take their cases from ``EVERY_CASE``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class TinyCase:
    """One model family (and input modality) for the test matrix."""

    name: str
    build: Callable[[], torch.nn.Module]  # a tiny random model, eval mode, fp32
    make_inputs: Callable[..., dict]  # (model, batch_size, seed) -> left-padded forward/generate kwargs
    #: N: selectable visual tokens of the smallest budget unit the inputs hold (an image,
    #: or a video frame under the default per-frame video budget), so any budget below it
    #: prunes every unit.
    tokens_per_image: int
    select_row: Callable[[dict, int], dict] | None = None  # (batch, row) -> that row alone, unpadded
    video: bool = False  # the inputs hold videos
    #: Selection inputs (``flashvlm.selection.REQUIREMENTS``) this family cannot serve, from
    #: its architecture: a method needing one must raise MethodUnavailableError.
    lacks: frozenset[str] = frozenset()

    @property
    def family(self) -> str:
        """The family module whose builder makes the model: ``families.<family>``."""
        return self.build.__module__.rsplit(".", 1)[1]


_TINY_MODELS: dict[Callable[[], torch.nn.Module], torch.nn.Module] = {}


def tiny_model(case: TinyCase) -> torch.nn.Module:
    """One model per builder for the whole session, shared by every test file (the video
    cases share the image cases')."""
    if case.build not in _TINY_MODELS:
        _TINY_MODELS[case.build] = case.build()
    return _TINY_MODELS[case.build]


# The family modules import TinyCase from here.
from . import (  # noqa: E402
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_next_video,
    llava_onevision,
    qwen3_vl,
    qwen_vl,
)

#: Every family module, in the lookup order of ``flashvlm.adapters.ADAPTERS``.
FAMILY_MODULES = (llava, llava_next, llava_onevision, qwen_vl, qwen3_vl, gemma3, internvl, idefics3, llava_next_video)
EVERY_CASE = [case for module in FAMILY_MODULES for case in module.CASES]

#: The families whose cases test_adapters.py and test_patch_runtime.py check one by one;
#: test_matrix.py and the tests over ``EVERY_CASE`` check every family.
ADAPTER_TEST_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen_vl", "qwen3_vl", "gemma3")
ADAPTER_TEST_CASES = [case for case in EVERY_CASE if case.family in ADAPTER_TEST_FAMILIES]


def case_named(name: str) -> TinyCase:
    return next(case for case in EVERY_CASE if case.name == name)
