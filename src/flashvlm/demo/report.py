"""The demo benchmark's fidelity table: every method at 22 %, 11 % and 5.6 % of the tokens.

    python -m flashvlm.demo.report --out docs/demo-report.md

exports the test split (JSONL + PNG, into a temporary folder unless ``--data`` names an
export), answers every question with the unpruned model (``none``) and with every
registered method at 56, 28 and 14 of the 256 tokens (LLaVA-1.5's 128, 64 and 32 of 576
as ratios), through :func:`flashvlm.eval.evaluate`, the same path ``flashvlm compare``
takes, and writes a Markdown table: accuracy overall and per question family (absolute
and as % of unpruned) and, for attribute questions, how often the queried object keeps at
least one token against the other objects of the scene. A selection that is text-guided
keeps the queried object more often than the others; one that only seeks objects keeps
both alike.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import FlashVLMError, MethodUnavailableError
from ..eval import evaluate, load_dataset
from ..eval.data import Example
from ..eval.report import RunSummary, set_relative, summarize
from ..eval.run import RowResult
from ..loading import load_model
from ..selection import available_methods
from .data import export_split, object_hits, target_indices
from .scenes import FAMILIES

#: The budgets as tokens of the demo's 256: 22 %, 11 % and 5.6 % (LLaVA-1.5's 128, 64, 32 of 576).
BUDGETS = (56, 28, 14)
MARKER = "<!-- demo-report -->"


def hit_rates(examples: Sequence[Example], results: Sequence[RowResult]) -> tuple[float | None, float | None]:
    """For attribute questions: share of queried objects, and of other objects, keeping a token."""
    queried, others = [], []
    for example, result in zip(examples, results, strict=True):
        if example.family != "attribute" or not result.kept_indices:
            continue
        row = {"objects": example.extra["objects"], "target": example.extra["target"]}
        hits = object_hits(row, result.kept_indices[0])
        targets = set(target_indices(row))
        queried += [hit for index, hit in enumerate(hits) if index in targets]
        others += [hit for index, hit in enumerate(hits) if index not in targets]
    share = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return share(queried), share(others)


def run_report(model, processor, examples: Sequence[Example], methods: Sequence[str], batch_size: int, progress: bool):
    """Rows of (summary, queried hit rate, other hit rate), the unpruned reference first."""
    # The demo model was trained on the bare question: no short-answer suffix.
    settings = dict(batch_size=batch_size, max_new_tokens=3, prompt_suffix="", progress=progress)
    reference = summarize("none", "all", evaluate(model, processor, examples, "none", 1.0, **settings))
    rows = [(reference, None, None)]
    for method in methods:
        for budget in BUDGETS:
            try:
                results = evaluate(model, processor, examples, method, budget, **settings)
            except MethodUnavailableError as error:
                summary = RunSummary(method, str(budget), unavailable=str(error))
                rows.append((summary, None, None))
                continue
            rows.append((summarize(method, str(budget), results), *hit_rates(examples, results)))
    set_relative([summary for summary, *_ in rows], reference)
    return rows


def markdown(rows, command: str, examples: int) -> str:
    percent = lambda value: "–" if value is None else f"{100 * value:.1f}"  # noqa: E731
    header = [
        "method",
        "tokens",
        "accuracy %",
        "% of unpruned",
        *[f"{family} %" for family in FAMILIES],
        "queried hit %",
        "other hit %",
    ]
    lines = [
        MARKER,
        f"Test split, {examples} questions, greedy answers; regenerate with `{command}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for summary, queried, other in rows:
        if summary.unavailable:
            lines.append(
                f"| {summary.method} | {summary.budget} | not available: {summary.unavailable} |"
                + " |" * (len(header) - 3)
            )
            continue
        family = [percent(summary.family_accuracy.get(name)) for name in FAMILIES]
        relative = "100" if summary.method == "none" else percent(summary.relative)
        tokens = "256" if summary.method == "none" else summary.budget
        lines.append(
            f"| {summary.method} | {tokens} | {percent(summary.accuracy)} | {relative} | "
            + " | ".join(family)
            + f" | {percent(queried)} | {percent(other)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from . import MODEL_DIR

    parser = argparse.ArgumentParser(prog="python -m flashvlm.demo.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL_DIR), help="model folder (default: the shipped demo model)")
    parser.add_argument("--data", help="an exported test split (JSONL); default: export one to a temporary folder")
    parser.add_argument("--size", type=int, default=400, help="questions when exporting (default 400)")
    parser.add_argument(
        "--methods",
        default=",".join(m for m in available_methods() if m != "none"),
        help="comma-separated methods (default: every registered method)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="Markdown file to write (default: print)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        if args.size < 1 or args.batch_size < 1:
            raise FlashVLMError(f"--size and --batch-size must be >= 1; got {args.size} and {args.batch_size}")
        methods = [name.strip() for name in args.methods.split(",") if name.strip()]
        model, processor = load_model(args.model, device="auto", dtype="float32")
        with tempfile.TemporaryDirectory() as folder:
            data = args.data or export_split("test", folder, args.size)
            examples = load_dataset(data, on_bad_row="stop").examples
            rows = run_report(model, processor, examples, methods, args.batch_size, not args.quiet)
    except (FlashVLMError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = "python -m flashvlm.demo.report" + (f" --size {args.size}" if args.size != 400 else "")
    text = markdown(rows, command, len(examples))
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
