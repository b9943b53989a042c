"""A run's finished predictions, kept on disk as they complete, so an interrupted run can resume.

The journal is JSON Lines, appended to and never rewritten: one line per (method, budget,
row) prediction, or one line per (method, budget) a method cannot run on the model. Each
append is flushed and fsync'd before the next batch starts, so Ctrl-C, a killed job or a
power cut loses at most the batch in flight. A kill in the middle of an append leaves a
last line without its newline; reading drops it, and the next append cuts it off first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import FlashVLMError
from .answers import RowResult

RunKey = tuple[str, str]  # (method as written, budget as written)


@dataclass
class JournalContents:
    """What a journal holds: the finished rows of every run, and the runs that cannot run."""

    results: dict[RunKey, dict[str, RowResult]] = field(default_factory=dict)  # run -> row id -> result
    unavailable: dict[RunKey, str] = field(default_factory=dict)  # run -> why the method cannot run

    @property
    def num_predictions(self) -> int:
        return sum(len(rows) for rows in self.results.values())


class RunJournal:
    """Append-only record of finished predictions at ``path``; use as a context manager to append."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file = None

    def read(self) -> JournalContents:
        """Everything the journal holds (empty when there is no file yet)."""
        contents = JournalContents()
        if not self.path.exists():
            return contents
        complete, _ = self._complete_lines()
        for number, line in enumerate(complete, start=1):
            try:
                record = json.loads(line)
                key = (record.pop("method"), record.pop("budget"))
                if "unavailable" in record:
                    contents.unavailable[key] = record["unavailable"]
                else:
                    row = RowResult(**record)
                    contents.results.setdefault(key, {})[row.id] = row
            except (ValueError, KeyError, TypeError) as error:
                raise FlashVLMError(
                    f"{self.path} line {number} is not a journal record ({error}); "
                    "it was edited or written by another program: start again with --overwrite"
                ) from None
        return contents

    def _complete_lines(self) -> tuple[list[bytes], int]:
        """The journal's newline-terminated lines, and the byte length they span."""
        data = self.path.read_bytes()
        length = data.rfind(b"\n") + 1  # a last line without its newline was cut short by a kill
        return [line for line in data[:length].split(b"\n") if line.strip()], length

    def __enter__(self) -> RunJournal:
        if self.path.exists():
            _, length = self._complete_lines()
            if length != self.path.stat().st_size:
                os.truncate(self.path, length)
        self._file = open(self.path, "ab")
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        file, self._file = self._file, None
        try:
            file.close()  # flushes what a failed append left in the buffer: it fails the same way
        except OSError as error:
            if exc_type is None:
                raise type(error)(error.errno, f"cannot append to {self.path}: {error.strerror}") from None
            # The error in flight (naming the journal) says it already.

    def append_rows(self, method: str, budget: str, rows: Sequence[RowResult]) -> None:
        self._append([{"method": method, "budget": budget, **asdict(row)} for row in rows])

    def append_unavailable(self, method: str, budget: str, reason: str) -> None:
        self._append([{"method": method, "budget": budget, "unavailable": reason}])

    def _append(self, records: list[dict]) -> None:
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        try:
            self._file.write(text.encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:
            raise type(error)(error.errno, f"cannot append to {self.path}: {error.strerror}") from None
