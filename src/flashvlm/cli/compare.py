"""``flashvlm compare``: every method x budget on one dataset, one model, one protocol."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import FlashVLMError, MethodUnavailableError
from ..eval import (
    BAD_ROW_POLICIES,
    SHORT_ANSWER_PROMPT,
    evaluate,
    load_dataset,
    plot_accuracy,
    set_relative,
    summarize,
    write_csv,
    write_markdown,
)
from ..eval.report import RunSummary
from ..loading import load_model
from ..selection import available_methods, get_method, parse_budget
from .common import add_model_arguments

#: The unpruned reference every run is compared with.
REFERENCE = "none"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare selection methods and budgets on a dataset of (image, question, answer) rows",
        description=(
            "Run every method at every budget (and the unpruned model once, as the reference) on a "
            "JSONL dataset; write a Markdown table, a CSV, an accuracy-versus-budget plot and every "
            "prediction to --out."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="JSONL file of {id, image, question, answer[, family]} rows")
    parser.add_argument(
        "--methods",
        default=",".join(name for name in available_methods() if name != REFERENCE),
        help="comma-separated methods, each optionally NAME:PRESET (default: all but 'none')",
    )
    parser.add_argument("--budgets", default="192,128,64,32", help="comma-separated budgets: 64, 0.25 or 25%% each")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per generate call (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N usable rows")
    parser.add_argument("--out", default="flashvlm-compare", help="output folder (default ./flashvlm-compare)")
    parser.add_argument(
        "--on-bad-row", choices=BAD_ROW_POLICIES, default="skip",
        help="a malformed row is skipped and listed (default) or stops the run",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--prompt-suffix", default=SHORT_ANSWER_PROMPT,
        help="appended to every question (default: lmms-eval's short-answer instruction)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise FlashVLMError(f"--{name} must be an integer >= 1; got {value}")


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before the model is loaded.
    _positive("batch-size", args.batch_size)
    _positive("limit", args.limit)
    _positive("max-new-tokens", args.max_new_tokens)
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    if not methods:
        raise FlashVLMError("--methods is empty; name at least one of " + ", ".join(available_methods()))
    for method in methods:
        get_method(method)
    budget_texts = [text.strip() for text in args.budgets.split(",") if text.strip()]
    if not budget_texts:
        raise FlashVLMError("--budgets is empty; give budgets like 192,128,64,32")
    budgets = [parse_budget(text) for text in budget_texts]
    dataset = load_dataset(args.data, on_bad_row=args.on_bad_row)
    for bad in dataset.bad_rows:
        print(f"flashvlm compare: skipped {args.data} line {bad.line}: {bad.reason}", file=sys.stderr)
    examples = dataset.examples[: args.limit]
    if not examples:
        raise FlashVLMError(f"{args.data} has no usable rows ({len(dataset.bad_rows)} skipped)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, processor = load_model(args.model, args.device, args.dtype)
    # One untimed batch first, so one-off start-up costs are charged to no method.
    evaluate(model, processor, examples[: args.batch_size], REFERENCE, 1, max_new_tokens=1, progress=False)
    runs = [(REFERENCE, "all", 1)]
    runs += [
        (method, text, budget)
        for method in methods
        if method != REFERENCE
        for text, budget in zip(budget_texts, budgets)
    ]
    summaries: list[RunSummary] = []
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as predictions:
        for method, budget_text, budget in tqdm(runs, desc="methods x budgets", unit="run", disable=args.no_progress):
            try:
                results = evaluate(
                    model, processor, examples, method, budget, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, prompt_suffix=args.prompt_suffix,
                    progress=not args.no_progress,
                )  # fmt: skip
            except MethodUnavailableError as error:
                print(f"flashvlm compare: {method} at {budget_text}: {error}", file=sys.stderr)
                summaries.append(RunSummary(method, budget_text, unavailable=str(error)))
                continue
            summaries.append(summarize(method, budget_text, results))
            for row in results:
                predictions.write(json.dumps({"method": method, "budget": budget_text, **asdict(row)}) + "\n")

    reference = summaries[0]
    set_relative(summaries, reference)
    notes = [
        f"Model: `{args.model}`; data: `{args.data}` ({len(examples)} rows scored, "
        f"{len(dataset.bad_rows)} malformed rows skipped); batch size {args.batch_size}, greedy decoding.",
        "Accuracy: lmms-eval's normalised exact match unless a row says otherwise. relative_to_none: accuracy "
        "divided by the unpruned model's (blank when that is 0). visual_tokens: mean kept per image. Times: mean per example, "
        "device-synchronised; selection_ms is vision encoding + selection (and fastv's scoring pass), "
        "prefill_ms the language model's prefill.",
    ]
    write_markdown(summaries, out / "compare.md", "flashvlm compare", notes, dataset.bad_rows)
    write_csv(summaries, out / "compare.csv")
    plot_accuracy(summaries[1:], reference, out / "accuracy_vs_budget.png")
    print((out / "compare.md").read_text(encoding="utf-8"))
    print(
        f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'accuracy_vs_budget.png'}, {out / 'predictions.jsonl'}"
    )
    return 0
