"""``flashvlm compare``: every method x budget on one dataset, one model, one protocol."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import FlashVLMError, MethodUnavailableError, os_error_message
from ..eval import (
    BAD_ROW_POLICIES,
    SHORT_ANSWER_PROMPT,
    RunSummary,
    answer_questions,
    load_dataset,
    markdown_report,
    plot_accuracy,
    plotting_available,
    set_relative,
    summarize,
    write_csv,
)
from ..eval.journal import JournalContents, RunJournal
from ..files import atomic_write, write_text_atomic
from ..loading import check_device, load_model, resolve_dtype
from ..selection import available_methods, get_method, parse_budget
from .common import (
    add_model_arguments,
    budget_key,
    check_count,
    check_output_folder,
    parse_budgets,
    without_repeats,
)

#: The unpruned reference every run is compared with.
REFERENCE = "none"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare selection methods and budgets on a dataset of (image, question, answer) rows",
        description=(
            "Run every method at every budget (and the unpruned model once, as the reference) on a "
            "JSONL dataset; write a Markdown table, a CSV, an accuracy-versus-budget plot and every "
            "prediction to --out. Every finished prediction is journaled in --out as it completes, so an "
            "interrupted run loses nothing and --resume continues it."
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
    earlier = parser.add_mutually_exclusive_group()
    earlier.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out where it stopped (same model, data, methods, budgets)",
    )  # fmt: skip
    earlier.add_argument("--overwrite", action="store_true", help="replace the run in --out")
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


#: What a run leaves in --out: its settings, the journal of finished predictions, the outputs.
SETTINGS_FILE = "run.json"
JOURNAL_FILE = "journal.jsonl"
OUTPUT_FILES = ("predictions.jsonl", "compare.csv", "compare.md", "accuracy_vs_budget.png")
#: Settings a resumed run must share with the run it continues: each changes the predictions.
#: --batch-size, --limit, --device and --on-bad-row may differ (--limit can stage a long run).
RESUME_SETTINGS = ("model", "data_sha256", "methods", "budgets", "max_new_tokens", "prompt_suffix", "dtype")


def _check_out_folder(out: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse an --out that cannot hold this run; True when it holds an earlier run to resume.

    A settings file alone is no earlier run: that run stopped before it finished anything.
    """
    check_output_folder("--out", out)

    def holds_work(name: str) -> bool:
        path = out / name
        return path.exists() and (name != JOURNAL_FILE or path.stat().st_size > 0)

    earlier = [name for name in (SETTINGS_FILE, JOURNAL_FILE, *OUTPUT_FILES) if holds_work(name)]
    if earlier in ([], [SETTINGS_FILE]) or overwrite:
        if resume:
            print(f"flashvlm compare: note: no earlier run in {out}; starting a new one", file=sys.stderr)
        return False
    if not resume:
        raise FlashVLMError(
            f"--out {out} holds an earlier run ({', '.join(earlier)}); pass --resume to continue it, "
            "--overwrite to replace it, or another --out"
        )
    if not (out / SETTINGS_FILE).exists():
        raise FlashVLMError(f"--out {out} holds outputs but no {SETTINGS_FILE} to resume from; use --overwrite")
    return True


def _settings(args: argparse.Namespace, methods: list[str], budget_texts: list[str], dtype: str) -> dict:
    model = Path(args.model)
    return {
        "model": str(model.resolve()) if model.is_dir() else args.model,
        "data": str(Path(args.data).resolve()),
        "data_sha256": hashlib.sha256(Path(args.data).read_bytes()).hexdigest(),
        "methods": methods,
        "budgets": budget_texts,
        "max_new_tokens": args.max_new_tokens,
        "prompt_suffix": args.prompt_suffix,
        "dtype": dtype,
    }


def _dtype_name(dtype: str, device: torch.device) -> str:
    """One name for each dtype, however it was spelled: auto and fp32 are float32 on a CPU."""
    return str(resolve_dtype(dtype, device)).removeprefix("torch.")


def _check_same_settings(out: Path, settings: dict, device: torch.device) -> None:
    """Refuse a --resume whose settings differ from the recorded run's; budgets that differ
    only in spelling take the recorded spelling in ``settings`` (the journal's keys)."""
    try:
        recorded = json.loads((out / SETTINGS_FILE).read_text(encoding="utf-8"))
    except ValueError as error:
        raise FlashVLMError(f"{out / SETTINGS_FILE} is not readable JSON ({error}); use --overwrite") from None
    with contextlib.suppress(FlashVLMError):  # a run recorded by an earlier version may say auto or fp16
        recorded["dtype"] = _dtype_name(recorded.get("dtype"), device)
    with contextlib.suppress(FlashVLMError, TypeError, AttributeError):  # "32.0" or " 32" resumes a run of "32"
        if [budget_key(parse_budget(text)) for text in recorded["budgets"]] == [
            budget_key(parse_budget(text)) for text in settings["budgets"]
        ]:
            settings["budgets"] = recorded["budgets"]
    for name in RESUME_SETTINGS:
        if recorded.get(name) != settings[name]:
            if name == "data_sha256":
                change = f"the data file changed since ({recorded.get('data')})"
            else:
                change = f"{name} was {recorded.get(name)!r}, now {settings[name]!r}"
            raise FlashVLMError(
                f"--resume: {out} holds a run with other settings: {change}; "
                "rerun with the same settings, or use --overwrite or another --out"
            )


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before the model is loaded, and an earlier
    # run in --out is left as it is until the model has loaded.
    check_count("--batch-size", args.batch_size)
    check_count("--limit", args.limit)
    check_count("--max-new-tokens", args.max_new_tokens)
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    methods = [name for name in without_repeats("compare", methods, methods, "method") if name != REFERENCE]
    if not methods:
        comparable = [name for name in available_methods() if name != REFERENCE]
        raise FlashVLMError(
            f"--methods names no method to compare ({REFERENCE}, the unpruned reference, always runs); "
            f"name at least one of {', '.join(comparable)}"
        )
    for method in methods:
        get_method(method)
    budget_texts = [text.strip() for text in args.budgets.split(",") if text.strip()]
    if not budget_texts:
        raise FlashVLMError("--budgets is empty; give budgets like 192,128,64,32")
    budgets = parse_budgets("compare", budget_texts)
    budget_texts = list(budgets)
    device = check_device(args.device)
    dtype = _dtype_name(args.dtype, device)
    out = Path(args.out)
    resuming = _check_out_folder(out, args.resume, args.overwrite)
    dataset = load_dataset(args.data, on_bad_row=args.on_bad_row)
    for bad in dataset.bad_rows:
        print(f"flashvlm compare: skipped {args.data} line {bad.line}: {bad.reason}", file=sys.stderr)
    examples = dataset.examples[: args.limit]
    if not examples:
        raise FlashVLMError(f"{args.data} has no usable rows ({len(dataset.bad_rows)} skipped)")
    settings = _settings(args, methods, budget_texts, dtype)
    journal = RunJournal(out / JOURNAL_FILE)
    done = JournalContents()
    if resuming:
        _check_same_settings(out, settings, device)  # budgets take the recorded run's spelling
        budgets = {recorded: budgets[text] for recorded, text in zip(settings["budgets"], budget_texts)}
        budget_texts = settings["budgets"]
        done = journal.read()
        print(f"flashvlm compare: resuming {out}: {done.num_predictions} predictions already done", file=sys.stderr)

    runs = [(REFERENCE, "all", 1)] + [(method, text, budgets[text]) for method in methods for text in budget_texts]
    pending = {
        (method, text): [example for example in examples if example.id not in done.results.get((method, text), {})]
        for method, text, _ in runs
        if (method, text) not in done.unavailable
    }
    model = processor = None
    if any(pending.values()):
        model, processor = load_model(args.model, args.device, dtype)
        # One untimed batch first, so one-off start-up costs are charged to no method.
        answer_questions(model, processor, examples[: args.batch_size], REFERENCE, 1, max_new_tokens=1, progress=False)
    if not resuming:  # only now, with the model loaded and run once, does an earlier run give way
        out.mkdir(exist_ok=True)
        for name in (JOURNAL_FILE, *OUTPUT_FILES):
            (out / name).unlink(missing_ok=True)
        write_text_atomic(out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")
    if model is not None:
        _run_pending(args, model, processor, runs, pending, journal)
        done = journal.read()

    summaries = []
    for method, text, _ in runs:
        if (method, text) in done.unavailable:
            summaries.append(RunSummary(method, text, unavailable=done.unavailable[(method, text)]))
        else:
            summaries.append(summarize(method, text, [done.results[(method, text)][ex.id] for ex in examples]))
    set_relative(summaries, summaries[0])
    notes = [
        f"Model: `{args.model}`; data: `{args.data}` ({len(examples)} rows scored, "
        f"{len(dataset.bad_rows)} malformed rows skipped); greedy decoding.",
        "Accuracy: lmms-eval's normalised exact match unless a row says otherwise. relative_to_none: accuracy "
        "divided by the unpruned model's (blank when that is 0). visual_tokens: mean kept per image. Times: mean per example, "
        "device-synchronised; selection_ms is vision encoding + selection (and fastv's scoring pass), "
        "prefill_ms the language model's prefill.",
    ]
    report = markdown_report(summaries, "flashvlm compare", notes, dataset.bad_rows)
    _write_outputs(out, runs, examples, done, summaries, report)
    print(report)
    print(f"wrote {', '.join(str(out / name) for name in OUTPUT_FILES if (out / name).is_file())}")
    return 0


def _run_pending(args, model, processor, runs, pending: dict, journal: RunJournal) -> None:
    """Run every (method, budget) on the rows it has not answered yet, each batch journaled as it finishes."""
    finished = sum(not pending.get((method, text)) for method, text, _ in runs)
    bar = tqdm(total=len(runs), initial=finished, desc="methods x budgets", unit="run", disable=args.no_progress)
    try:
        with journal, bar:
            for method, text, budget in runs:
                todo = pending.get((method, text))
                if not todo:
                    continue
                label = "none (unpruned)" if method == REFERENCE else f"{method} @ {text}"
                try:
                    answer_questions(
                        model, processor, todo, method, budget, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, prompt_suffix=args.prompt_suffix,
                        progress=not args.no_progress, label=label,
                        on_batch=lambda rows, method=method, text=text: journal.append_rows(method, text, rows),
                    )  # fmt: skip
                except MethodUnavailableError as error:
                    print(f"flashvlm compare: {method} at {text}: {error}", file=sys.stderr)
                    journal.append_unavailable(method, text, str(error))
                bar.update()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_kept_in(journal)) from None
    except OSError as error:  # a full disk, while journaling or reading an image
        raise type(error)(error.errno, f"{os_error_message(error)}; {_kept_in(journal)}") from None


def _kept_in(journal: RunJournal) -> str:
    """What a stopped run keeps, and how to go on."""
    kept = journal.read().num_predictions
    return f"{kept} finished predictions are kept in {journal.path}; rerun with --resume to continue"


def _write_outputs(out: Path, runs, examples, done: JournalContents, summaries, report: str) -> None:
    """Every output, each atomically and each whatever happens to the others; one error names the failures."""
    reference = summaries[0]

    def predictions(path: Path) -> None:
        with atomic_write(path, encoding="utf-8") as file:
            for method, text, _ in runs:
                rows = done.results.get((method, text), {})
                for example in examples:
                    if example.id in rows:
                        record = {"method": method, "budget": text, **asdict(rows[example.id])}
                        file.write(json.dumps(record, ensure_ascii=False) + "\n")

    writers = {
        "predictions.jsonl": predictions,
        "compare.csv": lambda path: write_csv(summaries, path),
        "compare.md": lambda path: write_text_atomic(path, report),
        "accuracy_vs_budget.png": lambda path: plot_accuracy(summaries[1:], reference, path),
    }
    if not plotting_available():
        del writers["accuracy_vs_budget.png"]
        print(
            'flashvlm compare: note: accuracy_vs_budget.png needs the matplotlib package: pip install "flashvlm[plot]"',
            file=sys.stderr,
        )
    failures: list[OSError] = []
    written = []
    for name in (name for name in OUTPUT_FILES if name in writers):
        try:
            writers[name](out / name)
            written.append(name)
        except OSError as error:
            failures.append(error)
    if failures:
        first = failures[0]
        raise type(first)(
            first.errno,
            f"{first.strerror}; {len(failures)} of {len(OUTPUT_FILES)} outputs not written"
            + (f" ({', '.join(written)} written)" if written else "")
            + f"; every prediction is kept in {out / JOURNAL_FILE}: rerun with --resume to write them",
        )
