"""Short-answer VQA data on disk, and how answers are scored.

A dataset is a JSONL file, one question per line::

    {"id": "q17", "image": "images/q17.png", "question": "What colour is the circle?",
     "answer": "red", "family": "attribute"}

``image`` is relative to the JSONL file's folder (or absolute); ``family`` (the
question type) is optional. Answers are scored by :func:`exact_match`, the
normalised exact match of short-answer VQA: every consumer (the lmms-eval task,
direct evaluation) scores through this one function.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import FlashVLMError

REQUIRED_FIELDS = ("id", "image", "question", "answer")


class DatasetError(FlashVLMError):
    """A dataset file or row that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class VQARow:
    """One question of a dataset, with its image path resolved."""

    line: int  # 1-based line number in the JSONL file
    id: str
    image: Path
    question: str
    answer: str
    family: str | None = None


def read_rows(path: str | Path) -> list[VQARow]:
    """Every row of a JSONL dataset, or :class:`DatasetError` naming the first bad line.

    A row is bad if it is not a JSON object, lacks a required field, has an empty
    question or answer, or points to an image file that does not exist. Blank lines are
    skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            rows.append(_parse_row(text, path, number))
    if not rows:
        raise DatasetError(f"{path} holds no rows")
    return rows


def _parse_row(text: str, path: Path, number: int) -> VQARow:
    where = f"{path}:{number}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in REQUIRED_FIELDS if record.get(name) in (None, "")]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}; each row needs {', '.join(REQUIRED_FIELDS)}")
    image = path.parent / str(record["image"])
    if not image.is_file():
        raise DatasetError(f"{where}: image file not found: {image}")
    family = record.get("family")
    return VQARow(
        line=number,
        id=str(record["id"]),
        image=image,
        question=str(record["question"]),
        answer=str(record["answer"]),
        family=None if family in (None, "") else str(family),
    )


# The normalisation of the VQA challenge's evaluation (also lmms-eval's VQAv2, TextVQA
# and VizWiz scoring), applied to both sides: punctuation, then number words and
# articles.
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # "1.5" keeps its period, "red." loses it
_COMMA_IN_NUMBER = re.compile(r"(?<=\d)(,)+(?=\d)")


def normalize_answer(text: str) -> str:
    """Lower-case ``text`` and drop punctuation, articles and number words' spelling.

    ``"The Red."`` and ``"red"`` normalise alike, as do ``"two"`` and ``"2"``.
    """
    text = " ".join(text.split())
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for mark in _PUNCTUATION:
        # A mark next to a space (or any mark, in text with a number like 1,000) is
        # removed; a mark inside a word separates it ("black-white" -> "black white").
        if mark + " " in text or " " + mark in text or has_number_comma:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = (_NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(word for word in words if word not in _ARTICLES)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 if the prediction equals the answer after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))
