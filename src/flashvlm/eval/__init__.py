"""Evaluation: datasets of (image, question, answer) rows, lmms-eval-style scoring,
batched generation with a method attached, and reports.

    from flashvlm.eval import answer_questions, load_dataset
    dataset = load_dataset("vqa.jsonl")
    results = answer_questions(model, processor, dataset.examples, "flashvlm", budget=64)
"""

from .answers import SHORT_ANSWER_PROMPT, RowResult, answer_questions
from .dataset import BAD_ROW_POLICIES, BadRow, Dataset, DatasetError, Example, load_dataset
from .scoring import SCORING_RULES, normalize_answer, score_answer
from .summary import (
    RunSummary,
    markdown_report,
    markdown_table,
    plot_accuracy,
    plotting_available,
    set_relative,
    summarize,
    write_csv,
    write_markdown,
)

__all__ = [
    "BAD_ROW_POLICIES",
    "SCORING_RULES",
    "SHORT_ANSWER_PROMPT",
    "BadRow",
    "Dataset",
    "DatasetError",
    "Example",
    "RowResult",
    "RunSummary",
    "answer_questions",
    "load_dataset",
    "markdown_report",
    "markdown_table",
    "normalize_answer",
    "plot_accuracy",
    "plotting_available",
    "score_answer",
    "set_relative",
    "summarize",
    "write_csv",
    "write_markdown",
]
