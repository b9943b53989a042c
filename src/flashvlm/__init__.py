"""flashvlm: keep only the visual tokens that matter for the question.

import flashvlm
with flashvlm.prune(model, budget=64):
    model.generate(**inputs)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import BudgetError, FlashVLMError, MethodUnavailableError, UnsupportedModelError

__version__ = "0.1.0"

#: The module each public name comes from. They are imported on first use: importing torch
#: takes seconds, and the command line can answer Ctrl-C cleanly only once its main() runs.
_PUBLIC_FROM = {
    "adapter_for": "adapters",
    "supported_architectures": "adapters",
    "Pruner": "patch",
    "PruneOptions": "patch",
    "apply": "patch",
    "prune": "patch",
    "remove": "patch",
    "FlashVLM": "selection",
    "Selection": "selection",
    "SelectionInputs": "selection",
    "TokenSelector": "selection",
    "available_methods": "selection",
    "get_method": "selection",
    "parse_budget": "selection",
}

if TYPE_CHECKING:
    from .adapters import adapter_for, supported_architectures
    from .patch import PruneOptions, Pruner, apply, prune, remove
    from .selection import (
        FlashVLM,
        Selection,
        SelectionInputs,
        TokenSelector,
        available_methods,
        get_method,
        parse_budget,
    )


def __getattr__(name: str):
    if name not in _PUBLIC_FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC_FROM[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC_FROM})


__all__ = [
    "BudgetError",
    "FlashVLM",
    "FlashVLMError",
    "MethodUnavailableError",
    "PruneOptions",
    "Pruner",
    "Selection",
    "SelectionInputs",
    "TokenSelector",
    "UnsupportedModelError",
    "adapter_for",
    "apply",
    "available_methods",
    "get_method",
    "parse_budget",
    "prune",
    "remove",
    "supported_architectures",
]
