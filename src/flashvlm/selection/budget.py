"""Token budgets: an absolute count of visual tokens, or a ratio of the tokens an image has."""

from __future__ import annotations

import math
import numbers

from ..errors import BudgetError

Budget = int | float


def validate_budget(budget: object, written: str | None = None) -> Budget:
    """Return ``budget`` if it is a valid budget, else raise :class:`BudgetError`.

    Accepted: an ``int`` >= 1 (tokens to keep per image; more than the image has keeps
    all of them) or a ``float`` in (0, 1] (share of each image's tokens). ``written`` is
    how the user wrote it, quoted in the message instead of the parsed value.
    """
    shown = written if written is not None else repr(budget)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BudgetError(
            f"budget must be a number: an integer >= 1 (tokens per image) or a ratio in (0, 1]; got {shown}"
        )
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise BudgetError(f"budget must be >= 1 visual token (or a ratio in (0, 1]); got {shown}")
        return int(budget)
    value = float(budget)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise BudgetError(
            f"a fractional budget is a ratio of the image's tokens and must lie in (0, 1]; got {shown} "
            "(use an integer for an absolute number of tokens)"
        )
    return value


def parse_budget(text: str) -> Budget:
    """Parse a budget written on the command line: ``64``, ``0.25`` or ``25%``.

    A number above 1 with no fractional part (``64.0``, ``1e3``) is a count of tokens;
    ``1`` is one token and ``1.0`` the whole image. Errors quote ``text`` as written.
    """
    stripped = text.strip()
    accepted = "an integer >= 1 (tokens per image), a ratio in (0, 1] or a percentage in (0%, 100%]"
    number = stripped.removesuffix("%")
    try:
        value = int(number) if number.lstrip("+-").isdigit() else float(number)
    except ValueError:
        raise BudgetError(f"budget must be {accepted}; got {text!r}") from None
    if stripped.endswith("%"):
        if not math.isfinite(value) or not 0 < value <= 100:
            raise BudgetError(f"a percentage budget must lie in (0%, 100%]; got {stripped}")
        return float(value) / 100.0
    if isinstance(value, float) and value > 1 and value.is_integer():
        value = int(value)
    return validate_budget(value, written=stripped)


def resolve_budget(budget: Budget, num_tokens: int) -> int:
    """Number of tokens to keep out of ``num_tokens``: always in [1, num_tokens]."""
    budget = validate_budget(budget)
    if isinstance(budget, int):
        return min(budget, num_tokens)
    return min(num_tokens, max(1, round(budget * num_tokens)))
