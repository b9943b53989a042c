"""flashvlm: keep only the visual tokens that matter for the question.

import flashvlm
with flashvlm.prune(model, budget=64):
    model.generate(**inputs)
"""

from .adapters import adapter_for, supported_architectures
from .errors import BudgetError, FlashVLMError, MethodUnavailableError, UnsupportedModelError
from .patch import Pruner, apply, prune, remove
from .selection import (
    FlashVLM,
    Selection,
    SelectionInputs,
    TokenSelector,
    available_methods,
    get_method,
    parse_budget,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "FlashVLM",
    "FlashVLMError",
    "MethodUnavailableError",
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
