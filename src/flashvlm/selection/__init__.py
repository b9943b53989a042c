"""Selection methods: pure tensor code behind one contract (no transformers import).

Importing this package registers every method; see :func:`available_methods`.
"""

from .base import (
    REQUIREMENTS,
    Selection,
    SelectionInputs,
    TokenSelector,
    available_methods,
    get_method,
    register,
)
from .budget import Budget, parse_budget, resolve_budget, validate_budget
from .flashvlm import FlashVLM

__all__ = [
    "REQUIREMENTS",
    "Budget",
    "FlashVLM",
    "Selection",
    "SelectionInputs",
    "TokenSelector",
    "available_methods",
    "get_method",
    "parse_budget",
    "register",
    "resolve_budget",
    "validate_budget",
]
