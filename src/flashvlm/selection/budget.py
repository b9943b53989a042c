"""Token budgets: an absolute count of visual tokens, or a ratio of the tokens an image has."""

from __future__ import annotations

import math
import numbers

from ..errors import BudgetError

Budget = int | float


def validate_budget(budget: object) -> Budget:
    """Return ``budget`` if it is a valid budget, else raise :class:`BudgetError`.

    Accepted: an ``int`` >= 1 (tokens to keep per image; more than the image has keeps
    all of them) or a ``float`` in (0, 1] (share of each image's tokens).
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BudgetError(
            f"budget must be a number: an integer >= 1 (tokens per image) or a ratio in (0, 1]; got {budget!r}"
        )
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise BudgetError(f"budget must be >= 1 visual token (or a ratio in (0, 1]); got {budget}")
        return int(budget)
    value = float(budget)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise BudgetError(
            f"a fractional budget is a ratio of the image's tokens and must lie in (0, 1]; got {budget!r} "
            "(use an integer for an absolute number of tokens)"
        )
    return value


def parse_budget(text: str) -> Budget:
    """Parse a budget written on the command line: ``64``, ``0.25`` or ``25%``."""
    stripped = text.strip()
    try:
        if stripped.endswith("%"):
            return validate_budget(float(stripped[:-1]) / 100.0)
        if stripped.lstrip("+-").isdigit():
            return validate_budget(int(stripped))
        return validate_budget(float(stripped))
    except ValueError as error:
        if isinstance(error, BudgetError):
            raise
        raise BudgetError(
            f"budget must be an integer >= 1, a ratio in (0, 1] or a percentage like 25%; got {text!r}"
        ) from None


def resolve_budget(budget: Budget, num_tokens: int) -> int:
    """Number of tokens to keep out of ``num_tokens``: always in [1, num_tokens]."""
    budget = validate_budget(budget)
    if isinstance(budget, int):
        return min(budget, num_tokens)
    return min(num_tokens, max(1, round(budget * num_tokens)))
