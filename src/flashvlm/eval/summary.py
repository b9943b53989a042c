"""Summaries of evaluation runs: a Markdown table, a CSV and an accuracy-versus-budget plot."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..files import atomic_write, write_text_atomic
from .answers import RowResult
from .dataset import BadRow


@dataclass
class RunSummary:
    """One method at one budget over the dataset."""

    method: str
    budget: str  # as the user wrote it ("64", "25%"), or "all" for the unpruned reference
    examples: int = 0
    accuracy: float | None = None
    family_accuracy: dict[str, float] = field(default_factory=dict)
    visual_tokens: float | None = None  # mean tokens kept per image
    selection_ms: float | None = None  # mean per example: vision encoding + selection
    prefill_ms: float | None = None  # mean per example: language-model prefill
    relative: float | None = None  # accuracy / the unpruned model's accuracy
    unavailable: str | None = None  # why the method could not run on this model

    @property
    def total_ms(self) -> float | None:
        if self.selection_ms is None or self.prefill_ms is None:
            return None
        return self.selection_ms + self.prefill_ms


def summarize(method: str, budget: str, results: Sequence[RowResult]) -> RunSummary:
    """Accuracy overall and per family, mean visual tokens per image, mean times per example."""
    summary = RunSummary(method, budget, examples=len(results))
    if not results:
        return summary
    summary.accuracy = sum(row.correct for row in results) / len(results)
    families = sorted({row.family for row in results if row.family is not None})
    for family in families:
        members = [row for row in results if row.family == family]
        summary.family_accuracy[family] = sum(row.correct for row in members) / len(members)
    kept = [count for row in results for count in row.visual_tokens]
    summary.visual_tokens = sum(kept) / len(kept) if kept else 0.0
    summary.selection_ms = 1000.0 * sum(row.selection_seconds for row in results) / len(results)
    summary.prefill_ms = 1000.0 * sum(row.prefill_seconds for row in results) / len(results)
    return summary


def set_relative(summaries: Sequence[RunSummary], reference: RunSummary) -> None:
    """Fill ``relative`` = accuracy / the reference's accuracy (None when that is 0)."""
    for summary in summaries:
        if summary.accuracy is not None and reference.accuracy:
            summary.relative = summary.accuracy / reference.accuracy


def _columns(summaries: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    families = sorted({family for summary in summaries for family in summary.family_accuracy})
    header = ["method", "budget", "examples", "accuracy", "relative_to_none", "visual_tokens"]
    header += ["selection_ms", "prefill_ms", "total_ms"] + [f"accuracy[{family}]" for family in families]
    rows = []
    for summary in summaries:
        if summary.unavailable is not None:
            rows.append(
                [summary.method, summary.budget, "0", f"unavailable: {summary.unavailable}"] + [""] * (len(header) - 4)
            )
            continue
        values = [summary.accuracy, summary.relative, summary.visual_tokens]
        values += [summary.selection_ms, summary.prefill_ms, summary.total_ms]
        values += [summary.family_accuracy.get(family) for family in families]
        formats = ["{:.4f}", "{:.4f}", "{:.1f}", "{:.2f}", "{:.2f}", "{:.2f}"] + ["{:.4f}"] * len(families)
        cells = ["" if value is None else fmt.format(value) for fmt, value in zip(formats, values)]
        rows.append([summary.method, summary.budget, str(summary.examples), *cells])
    return header, rows


def write_csv(summaries: Sequence[RunSummary], path: str | os.PathLike) -> None:
    header, rows = _columns(summaries)
    with atomic_write(path, newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def markdown_table(summaries: Sequence[RunSummary]) -> str:
    header, rows = _columns(summaries)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(
    summaries: Sequence[RunSummary], title: str, notes: Sequence[str] = (), bad_rows: Sequence[BadRow] = ()
) -> str:
    """The title, notes, table and skipped rows of a run, as Markdown."""
    parts = [f"# {title}", "", *notes, "", markdown_table(summaries), ""]
    if bad_rows:
        parts += [f"## Skipped rows ({len(bad_rows)})", ""]
        parts += [f"- line {row.line}: {row.reason}" for row in bad_rows] + [""]
    return "\n".join(parts)


def write_markdown(
    summaries: Sequence[RunSummary],
    path: str | os.PathLike,
    title: str,
    notes: Sequence[str] = (),
    bad_rows: Sequence[BadRow] = (),
) -> None:
    write_text_atomic(path, markdown_report(summaries, title, notes, bad_rows))


def plotting_available() -> bool:
    """Whether matplotlib, the ``plot`` extra, is installed."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_accuracy(summaries: Sequence[RunSummary], reference: RunSummary | None, path: str | os.PathLike) -> None:
    """Accuracy against mean visual tokens kept per image, one line per method (PNG; needs the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    methods = sorted({summary.method for summary in summaries if summary.accuracy is not None})
    for method in methods:
        points = sorted(
            (summary.visual_tokens, summary.accuracy)
            for summary in summaries
            if summary.method == method and summary.accuracy is not None
        )
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=method)
    if reference is not None and reference.accuracy is not None:
        axes.axhline(reference.accuracy, color="black", linestyle="--", linewidth=1, label="none (all tokens)")
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("visual tokens kept per image (mean)")
    axes.set_ylabel("accuracy")
    axes.set_title("Accuracy versus visual-token budget")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    try:
        with atomic_write(path, "wb") as file:
            figure.savefig(file, format="png", dpi=120)
    finally:
        plt.close(figure)
