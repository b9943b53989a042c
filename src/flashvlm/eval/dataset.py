"""Evaluation datasets: JSON Lines of (image, question, answer), checked row by row.

One row per line::

    {"id": "q1", "image": "images/1.png", "question": "What colour is the circle?",
     "answer": "red", "family": "colour"}

``id`` and ``answer`` may also be numbers (read as text). ``image`` is a path relative
to the JSONL file's folder (or absolute), or a list of
them for several images. ``family`` (optional) groups rows in reports. ``scoring``
(optional) says how the row is scored: "vqa" (default; lmms-eval's normalised exact
match), "exact" or "contains" (see :mod:`flashvlm.eval.scoring`). Any other field is
kept in ``extra``.

The file is UTF-8 (a byte-order mark is allowed). A row that cannot be used (bad JSON, NaN or Infinity,
bytes that are not UTF-8, a missing or empty field, a missing or unreadable image, a
repeated id, a question whose ``<image>`` placeholders are not one per image) is never scored: it is reported with its line number and either
skipped (``on_bad_row="skip"``, the default; listed in :attr:`Dataset.bad_rows`) or the
load stops with a :class:`DatasetError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FlashVLMError
from ..loading import IMAGE_PLACEHOLDER, load_image
from .scoring import SCORING_RULES

#: What a bad row does: be skipped and reported, or stop the load.
BAD_ROW_POLICIES = ("skip", "stop")
_REQUIRED_TEXT_FIELDS = ("id", "question", "answer")
#: Leading bytes of files that are not UTF-8 text at all, and what they are: the whole file
#: is refused at once rather than every line reported as a bad row.
_NOT_TEXT_SIGNATURES = {
    b"\x1f\x8b": "a gzip-compressed file; decompress it first (gunzip -k)",
    b"PK\x03\x04": "a zip archive; extract the JSONL file first",
    b"\xff\xfe": "UTF-16 text; save it as UTF-8",
    b"\xfe\xff": "UTF-16 text; save it as UTF-8",
}


class DatasetError(FlashVLMError):
    """A dataset file or row that cannot be used; the message names the file and line."""


@dataclass
class Example:
    """One usable dataset row."""

    id: str
    images: list[Path]  # resolved image paths, in prompt order
    question: str
    answer: str
    line: int  # 1-based line number in the JSONL file
    family: str | None = None
    scoring: str = "vqa"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BadRow:
    """A row that was skipped, and why."""

    line: int
    reason: str


@dataclass
class Dataset:
    """The usable rows of a JSONL file, and the rows that were skipped."""

    path: Path
    examples: list[Example]
    bad_rows: list[BadRow] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


def load_dataset(path: str | os.PathLike, on_bad_row: str = "skip") -> Dataset:
    """Read and check a JSONL dataset; every image is opened once to prove it is readable."""
    if on_bad_row not in BAD_ROW_POLICIES:
        raise FlashVLMError(f"on_bad_row must be one of {', '.join(BAD_ROW_POLICIES)}; got {on_bad_row!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"dataset {path} is a folder, not a file: name its JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    dataset = Dataset(path, [])
    seen_ids: dict[str, int] = {}
    with path.open("rb") as lines:
        start = lines.read(4)
        for signature, what in _NOT_TEXT_SIGNATURES.items():
            if start.startswith(signature):
                raise DatasetError(f"{path} is {what}; expected JSON Lines in UTF-8")
        lines.seek(0)
        for number, raw in enumerate(lines, start=1):
            try:
                text = _decode_line(raw, number)
                if not text.strip():
                    continue
                example = _parse_row(text, number, path.parent)
                if example.id in seen_ids:
                    raise DatasetError(f"id {example.id!r} repeats the row on line {seen_ids[example.id]}")
            except DatasetError as error:
                if on_bad_row == "stop":
                    raise DatasetError(f"{path} line {number}: {error}") from None
                dataset.bad_rows.append(BadRow(number, str(error)))
                continue
            seen_ids[example.id] = number
            dataset.examples.append(example)
    return dataset


def _decode_line(raw: bytes, number: int) -> str:
    """One line's bytes as text; line 1 may start with a UTF-8 byte-order mark (Windows editors write one)."""
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); save the file as UTF-8"
        ) from None


def _refuse_constant(name: str):
    """``json.loads`` reads NaN, Infinity and -Infinity, which JSON does not have; a row holding one is malformed."""
    raise DatasetError(f"not valid JSON ({name} is not a JSON number)")


def _parse_row(text: str, number: int, folder: Path) -> Example:
    try:
        row = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise DatasetError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"expected a JSON object, got {type(row).__name__}")
    for name in (*_REQUIRED_TEXT_FIELDS, "image"):
        if name not in row:
            raise DatasetError(f"missing field {name!r}")
    for name in ("id", "answer"):  # numeric ids ("id": 17) and answers ("answer": 2) are common
        if isinstance(row[name], int | float) and not isinstance(row[name], bool):
            row[name] = str(row[name])
    for name in _REQUIRED_TEXT_FIELDS:
        if not isinstance(row[name], str) or not row[name].strip():
            raise DatasetError(f"field {name!r} must be a non-empty string; got {row[name]!r}")
    family = row.get("family")
    if family is not None and not isinstance(family, str):
        raise DatasetError(f"field 'family' must be a string; got {family!r}")
    scoring = row.get("scoring", "vqa")
    if scoring not in SCORING_RULES:
        raise DatasetError(f"field 'scoring' must be one of {', '.join(SCORING_RULES)}; got {scoring!r}")
    images = row["image"] if isinstance(row["image"], list) else [row["image"]]
    if not images or not all(isinstance(image, str) and image for image in images):
        raise DatasetError(f"field 'image' must be a path or a non-empty list of paths; got {row['image']!r}")
    placeholders = row["question"].count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(images):
        raise DatasetError(
            f"field 'question' has {placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} image(s); "
            f"write one {IMAGE_PLACEHOLDER} per image, or none to have the images placed before the question"
        )
    paths = [folder / image for image in images]  # an absolute path stays as it is
    for image_path in paths:
        try:
            load_image(image_path)
        except (FlashVLMError, OSError) as error:
            raise DatasetError(str(error)) from None
    known = {*_REQUIRED_TEXT_FIELDS, "image", "family", "scoring"}
    extra = {name: value for name, value in row.items() if name not in known}
    return Example(row["id"], paths, row["question"], row["answer"], number, family, scoring, extra)
