"""A training run's learning curves from its ``log.jsonl``: a Markdown table and a PNG.

    python -m lab curves runs/cpu --out docs/demo-training.png

One row per checkpoint: stage, seconds into the stage, optimizer steps (times the stage's batch: samples), the answer (or
caption) loss, the grounding term and its cosine gap, ``image_gain``, and in ``tune`` the
first-token validation accuracy per question family.
"""

from __future__ import annotations

import json
from pathlib import Path

from .scenes import FAMILIES


def checkpoints(run: Path) -> list[dict]:
    """The checkpoint lines of ``run/log.jsonl`` (the latest of each (stage, step), in order)."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest: dict[tuple, dict] = {}
    for line in lines:
        if "stage" in line:
            latest[(line["stage"], line["step"])] = line
    return list(latest.values())


def markdown(lines: list[dict]) -> str:
    header = ["stage", "s", "step", "loss", "answer", "grounding", "cosine gap", "image gain", *FAMILIES, "overall"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    number = lambda value, digits=3: "–" if value is None else f"{value:.{digits}f}"  # noqa: E731
    for line in lines:
        accuracy = line.get("validation_first_token", {})
        rows.append(
            "| "
            + " | ".join(
                [
                    line["stage"],
                    f"{line['seconds']:.0f}",
                    str(line["step"]),
                    number(line.get("loss")),
                    number(line.get("answer")),
                    number(line.get("grounding")),
                    number(line.get("cosine_gap")),
                    number(line.get("image_gain")),
                    *[number(accuracy.get(family), 2) for family in [*FAMILIES, "overall"]],
                ]
            )
            + " |"
        )
    return "\n".join(rows) + "\n"


def plot(lines: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tune = [line for line in lines if line["stage"] == "tune" and "validation_first_token" in line]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    offset = 0.0
    for stage in ("clip", "align", "tune"):
        points = [line for line in lines if line["stage"] == stage]
        if points:
            left.plot([offset + p["seconds"] / 60 for p in points], [p["loss"] for p in points], "o-", label=stage)
            offset += points[-1]["seconds"] / 60
    left.set(xlabel="minutes of training", ylabel="training loss", yscale="log", title="loss per stage")
    left.legend()
    for family in [*FAMILIES, "overall"]:
        right.plot(
            [p["seconds"] / 60 for p in tune],
            [p["validation_first_token"].get(family) for p in tune],
            "o-",
            label=family,
            linewidth=2.5 if family == "overall" else 1.2,
        )
    right.set(xlabel="minutes into tune", ylabel="first-token accuracy", ylim=(0, 1), title="validation, tune stage")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def add_arguments(parser) -> None:
    parser.add_argument("folder", type=Path, help="a training run folder (holds log.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: the table only)")


def main(args) -> int:
    lines = checkpoints(args.folder)
    print(markdown(lines), end="")
    if args.out:
        plot(lines, args.out)
        print(f"wrote {args.out}")
    return 0
