"""``python -m lab COMMAND``: the workbench's one entry point (see ``python -m lab --help``)."""

from __future__ import annotations

import argparse
import sys


def counts(text: str) -> list[int]:
    """A comma-separated list of integers >= 1 (argparse names the option and exits 2 otherwise)."""
    try:
        values = [int(word) for word in text.split(",") if word.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, comma-separated; got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from . import curves, diagnose, report, splits, train

    parser = argparse.ArgumentParser(
        prog="python -m lab", description="The workbench: the demo's benchmark, training and reports."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a benchmark split as JSONL + PNG")
    splits.add_arguments(export)
    export.set_defaults(run=splits.main)
    training = commands.add_parser("train", help="train the demo model (LLaVA recipe, resumable)")
    train.add_arguments(training)
    training.set_defaults(run=train.main)
    for name, run, text in (
        ("evaluate", report.evaluate_main, "a model's accuracy per family at some budgets"),
        ("report", report.report_main, "every method at 56/28/14 tokens on the test split, as Markdown"),
    ):
        command = commands.add_parser(name, help=text)
        report.add_arguments(command, name)
        command.set_defaults(run=run)
    diagnosis = commands.add_parser("diagnose", help="norms, cosines and text-relevance weights of a trained model")
    diagnose.add_arguments(diagnosis)
    diagnosis.set_defaults(run=diagnose.main)
    curve = commands.add_parser("curves", help="a training run's learning curves: a Markdown table and a PNG")
    curves.add_arguments(curve)
    curve.set_defaults(run=curves.main)
    speed = commands.add_parser("speed", help="training samples per second by SmolLM2 depth, batch and precision")
    speed.add_argument(
        "--layers", default="2,4,8,30", type=counts, help="comma-separated SmolLM2 depths, 1-30 (default 2,4,8,30)"
    )
    speed.add_argument("--batch", default="8,16", type=counts, help="comma-separated batch sizes (default 8,16)")
    speed.add_argument("--steps", type=int, default=3, help="timed steps per setting, after one warm-up")
    speed.set_defaults(run=train.speed_main)
    rate = commands.add_parser("data-rate", help="training samples per second one CPU process prepares, per stage")
    rate.add_argument("--samples", type=int, default=64)
    rate.set_defaults(run=train.data_rate_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flashvlm.errors import FlashVLMError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FlashVLMError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
