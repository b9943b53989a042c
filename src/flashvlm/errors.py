"""Exceptions that carry a message meant for the user.

Everything flashvlm raises on bad input derives from :class:`FlashVLMError` (itself a
``ValueError``), so callers and the CLI can tell a user's mistake from a bug. A failed file
operation stays an ``OSError``; :func:`os_error_message` is the one line the CLI shows for it.
"""


class FlashVLMError(ValueError):
    """A user-facing error: the message names the bad value and what is accepted."""


class BudgetError(FlashVLMError):
    """The token budget is not a positive count or a ratio in (0, 1]."""


class UnsupportedModelError(FlashVLMError):
    """The model is not one of the architectures an adapter serves."""


class MethodUnavailableError(FlashVLMError):
    """A selection method needs an input (saliency, text, ...) the model cannot provide."""


def os_error_message(error: OSError) -> str:
    """One line for an OSError: its own text without the ``[Errno N]`` prefix, naming the file when it has one."""
    if not error.strerror:
        return str(error)
    if error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    return error.strerror


class QuestionNotFoundError(FlashVLMError):
    """A question (for ``text_tokens="question"``) that its prompt does not spell.

    ``row`` is its batch row; a caller that knows the row better (a dataset line and id)
    raises it again with ``where``.
    """

    def __init__(
        self,
        question: str,
        row: int,
        where: str | None = None,
        advice: str = "pass the user's words as the processor received them",
    ) -> None:
        self.question, self.row = question, row
        super().__init__(
            f"{where or f'batch row {row}'}: question {question[:60]!r} does not appear in its prompt: {advice}"
        )


def require_extra(extra: str, package: str, purpose: str) -> None:
    """Refuse in one line when an optional package is missing, naming the extra that installs it."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise FlashVLMError(f'{purpose} needs the {package} package: pip install "flashvlm[{extra}]"')
