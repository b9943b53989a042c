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
from .baselines import KeepAll, RandomTokens, SpatialPool
from .budget import Budget, parse_budget, resolve_budget, validate_budget
from .cdpruner import CDPruner
from .divprune import DivPrune
from .fastv import FastV
from .flashvlm import FlashVLM
from .visionzip import VisionZip
from .vispruner import VisPruner

__all__ = [
    "REQUIREMENTS",
    "Budget",
    "CDPruner",
    "DivPrune",
    "FastV",
    "FlashVLM",
    "KeepAll",
    "RandomTokens",
    "Selection",
    "SelectionInputs",
    "SpatialPool",
    "TokenSelector",
    "VisPruner",
    "VisionZip",
    "available_methods",
    "get_method",
    "parse_budget",
    "register",
    "resolve_budget",
    "validate_budget",
]
