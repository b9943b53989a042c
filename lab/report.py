"""The demo benchmark through ``flashvlm.eval``: one model's accuracy, and the fidelity table.

    python -m lab evaluate --split validation --budgets 1.0,56,28,14
    python -m lab report --out docs/demo-report.md

``evaluate`` answers a split with one method at some budgets and prints accuracy per
family (and the attribute hit rates when pruned). ``report`` exports the test split (JSONL + PNG, into a temporary folder unless ``--data`` names an
export), answers every question with the unpruned model (``none``) and with every
registered method at 56, 28 and 14 of the 256 tokens (LLaVA-1.5's 128, 64 and 32 of 576
as ratios), through :func:`flashvlm.eval.answer_questions`, the same path ``flashvlm compare``
takes, and writes a Markdown table: accuracy overall and per question family (absolute
and as % of unpruned) and, for attribute questions, how often the queried object keeps at
least one token against the other objects of the scene. A selection that is text-guided
keeps the queried object more often than the others; one that only seeks objects keeps
both alike.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from flashvlm.demo.model import demo_model_folder
from flashvlm.errors import FlashVLMError, MethodUnavailableError
from flashvlm.eval import RunSummary, answer_questions, load_dataset, set_relative, summarize
from flashvlm.eval.dataset import Example
from flashvlm.loading import load_model
from flashvlm.selection import available_methods, parse_budget

from .scenes import FAMILIES
from .splits import export_split, hit_rates

#: The budgets as tokens of the demo's 256: 22 %, 11 % and 5.6 % (LLaVA-1.5's 128, 64, 32 of 576).
BUDGETS = (56, 28, 14)
MARKER = "<!-- demo-report -->"
#: Every registered method but the unpruned reference.
DEFAULT_METHODS = [method for method in available_methods() if method != "none"]


def run_report(model, processor, examples: Sequence[Example], methods: Sequence[str], batch_size: int, progress: bool):
    """Rows of (summary, queried hit rate, other hit rate), the unpruned reference first."""
    # The demo model was trained on the bare question: no short-answer suffix.
    settings = dict(batch_size=batch_size, max_new_tokens=3, prompt_suffix="", progress=progress)
    reference = summarize("none", "all", answer_questions(model, processor, examples, "none", 1.0, **settings))
    rows = [(reference, None, None)]
    for method in methods:
        for budget in BUDGETS:
            try:
                results = answer_questions(model, processor, examples, method, budget, **settings)
            except MethodUnavailableError as error:
                summary = RunSummary(method, str(budget), unavailable=str(error))
                rows.append((summary, None, None))
                continue
            rows.append((summarize(method, str(budget), results), *hit_rates(examples, results)))
    set_relative([summary for summary, *_ in rows], reference)
    return rows


def markdown(rows, command: str, examples: int, seed: int = 0) -> str:
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
    seed = f" (seed {seed})" if seed else ""
    lines = [
        MARKER,
        f"Test split{seed}, {examples} questions, greedy answers; regenerate with `{command}`.",
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


def add_arguments(parser, command: str) -> None:
    parser.add_argument("--model", help="model folder or training run's parts/ (default: the shipped demo model)")
    parser.add_argument("--data", help="an exported split (JSONL); default: export one to a temporary folder")
    parser.add_argument("--size", type=int, default=400, help="questions when exporting (default 400)")
    parser.add_argument(
        "--seed", type=int, default=0, help="the split's seed when exporting (default 0; another is held out)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if command == "evaluate":
        parser.add_argument("--split", default="validation", choices=("validation", "test"))
        parser.add_argument("--budgets", default="1.0", help="comma-separated: 1.0 = unpruned, 28, 0.11, 11%%")
        parser.add_argument("--method", default="flashvlm")
        parser.add_argument("--out", type=Path, help="write the results as JSON here")
    else:
        parser.add_argument(
            "--methods",
            default=",".join(DEFAULT_METHODS),
            help="comma-separated methods (default: every registered method)",
        )
        parser.add_argument("--out", help="Markdown file to write (default: print)")


def _load(args, split: str, folder: str):
    """(model, processor, examples) for a command; FlashVLMError names a bad value."""
    if args.size < 1 or args.batch_size < 1:
        raise FlashVLMError(f"--size and --batch-size must be >= 1; got {args.size} and {args.batch_size}")
    model, processor = load_model(demo_model_folder(args.model), device="auto", dtype="float32")
    data = args.data or export_split(split, folder, args.size, args.seed)
    return model, processor, load_dataset(data, on_bad_row="stop").examples


def evaluate_main(args) -> int:
    texts = [text.strip() for text in args.budgets.split(",") if text.strip()]
    budgets = [parse_budget(text) for text in texts]  # a bad budget fails before anything loads
    settings = dict(batch_size=args.batch_size, max_new_tokens=3, prompt_suffix="", progress=not args.quiet)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        model, processor, examples = _load(args, args.split, folder)
        for text, budget in zip(texts, budgets):
            method = "none" if budget == 1.0 else args.method
            rows = answer_questions(model, processor, examples, method, budget, **settings)
            summary = summarize(method, text, rows)
            results[text] = {"accuracy": {**summary.family_accuracy, "overall": summary.accuracy}}
            if method != "none":
                queried, others = hit_rates(examples, rows)
                results[text]["attribute_hit_rate"] = {"queried": queried, "others": others}
            print(text, json.dumps(results[text]))
    if args.out:
        args.out.write_text(json.dumps({"split": args.split, "method": args.method, "results": results}, indent=2))
    return 0


def report_main(args) -> int:
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    with tempfile.TemporaryDirectory() as folder:
        model, processor, examples = _load(args, "test", folder)
        rows = run_report(model, processor, examples, methods, args.batch_size, not args.quiet)
    command = "python -m lab report" + (f" --size {args.size}" if args.size != 400 else "")
    command += f" --seed {args.seed}" if args.seed else ""
    command += f" --methods {','.join(methods)}" if methods != DEFAULT_METHODS else ""
    text = markdown(rows, command, len(examples), args.seed)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0
