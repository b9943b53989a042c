"""Benchmark splits as rows, their JSONL + PNG export, and the token hit-rate geometry.

    python -m lab export --split test --out data/grounded-test

writes ``data/grounded-test/test.jsonl`` and ``data/grounded-test/images/*.png``. Each
row is ``{"id", "image", "question", "answer", "family", "objects", "target"}``:
``image`` is relative to the JSONL's folder; ``objects`` holds every object's shape,
colour, size and pixel ``bbox`` [x0, y0, x1, y1] (end exclusive); ``target`` is the
index (or list of indices) of the queried object(s), or null when the queried object
is absent. This is the format ``flashvlm compare --data`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from flashvlm.demo.model import GRID, IMAGE_SIZE

from .scenes import SPLITS, SceneQuestion, split_example

#: Rows per split unless asked otherwise (train is unbounded; this is what gets exported).
DEFAULT_SIZES = {"train": 2000, "validation": 400, "test": 400}


def split_examples(split: str, size: int | None = None, seed: int = 0) -> list[SceneQuestion]:
    """The first ``size`` examples of a split (families take turns)."""
    return [split_example(seed, split, index) for index in range(size or DEFAULT_SIZES[split])]


def example_row(example: SceneQuestion, row_id: str, image: str) -> dict:
    return {
        "id": row_id,
        "image": image,
        "question": example.question,
        "answer": example.answer,
        "family": example.family,
        "objects": example.object_dicts(),
        "target": example.target,
    }


def export_split(split: str, out: str | Path, size: int | None = None, seed: int = 0) -> Path:
    """Write ``out/<split>.jsonl`` and ``out/images/<id>.png``; return the JSONL's path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    with path.open("w") as handle:
        for index, example in enumerate(split_examples(split, size, seed)):
            row_id = f"{split}-{seed}-{index:05d}"
            image = f"images/{row_id}.png"
            example.render().save(out / image)
            handle.write(json.dumps(example_row(example, row_id, image)) + "\n")
    return path


def object_tokens(bbox: Sequence[int], grid: tuple[int, int] = (GRID, GRID), image_size: int = IMAGE_SIZE) -> list[int]:
    """Raster indices of the grid cells a pixel box overlaps (end-exclusive box)."""
    rows, columns = grid
    cell_h, cell_w = image_size / rows, image_size / columns
    x0, y0, x1, y1 = bbox
    first_col, last_col = int(x0 // cell_w), int((x1 - 1) // cell_w)
    first_row, last_row = int(y0 // cell_h), int((y1 - 1) // cell_h)
    return [
        r * columns + c
        for r in range(max(first_row, 0), min(last_row, rows - 1) + 1)
        for c in range(max(first_col, 0), min(last_col, columns - 1) + 1)
    ]


def object_hits(
    row: dict, keep_indices: Sequence[int], grid: tuple[int, int] = (GRID, GRID), image_size: int = IMAGE_SIZE
) -> list[bool]:
    """For each object of ``row``: does at least one kept token overlap its box?"""
    kept = {int(i) for i in keep_indices}
    return [any(t in kept for t in object_tokens(obj["bbox"], grid, image_size)) for obj in row["objects"]]


def target_indices(row: dict) -> list[int]:
    """The queried objects of a row as a list (empty when the queried object is absent)."""
    target = row["target"]
    if target is None:
        return []
    return [target] if isinstance(target, int) else list(target)


def add_arguments(parser) -> None:
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", type=int, help="rows (default: 400 for validation/test, 2000 for train)")
    parser.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    path = export_split(args.split, args.out, args.size, args.seed)
    print(f"wrote {path} ({args.size or DEFAULT_SIZES[args.split]} rows, {IMAGE_SIZE} px, {GRID} x {GRID} tokens)")
    return 0


def hit_rates(examples: Sequence, results: Sequence) -> tuple[float | None, float | None]:
    """For attribute questions: the share of queried objects, and of other objects, keeping a token.

    ``examples`` are ``flashvlm.eval.SceneQuestion`` rows of an export (objects and target in
    ``extra``), ``results`` their ``flashvlm.eval.RowResult`` under one method and budget.
    A selection guided by the question keeps the queried object more often than the others.
    """
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
