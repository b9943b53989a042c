"""A local lmms-eval task over a short-answer VQA JSONL file (no download).

    python -m flashvlm.integrations.lmms_eval.jsonl_task data/test.jsonl --task demo_test --out tasks/
    python -m lmms_eval --model flashvlm --model_args pretrained=PATH,method=flashvlm,budget=64 \\
        --tasks demo_test --include_path tasks/

The JSONL format is the one ``flashvlm compare`` reads (:func:`flashvlm.eval.load_dataset`:
``id``, ``image`` relative to the file's folder, ``question``, ``answer``, optional
``family`` and ``scoring``). The written YAML loads the file with the ``json`` builder of
Hugging Face ``datasets`` and refers back to the functions below, so the prompt is the
bare question (the model wraps it in its chat format) and the score is
:func:`flashvlm.eval.score_answer`, overall (``exact_match``) and per question family
(``exact_match_<family>``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ...errors import FlashVLMError
from ...eval import load_dataset, score_answer
from ...loading import load_image

#: Generation settings of the written task: greedy, at most this many new tokens.
MAX_NEW_TOKENS = 16
_MODULE = __name__


def doc_to_visual(doc: dict, lmms_eval_specific_kwargs: dict) -> list:
    images = doc["image"] if isinstance(doc["image"], list) else [doc["image"]]
    return [load_image(Path(lmms_eval_specific_kwargs["image_root"]) / image) for image in images]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    score = float(score_answer(results[0], str(doc["answer"]), doc.get("scoring") or "vqa"))
    scores = {"exact_match": score}
    if doc.get("family"):
        scores[family_metric(doc["family"])] = score
    return scores


def family_metric(family: str) -> str:
    """The metric name of one question family's accuracy."""
    return "exact_match_" + re.sub(r"\W+", "_", str(family)).strip("_").lower()


def task_yaml(data: str | Path, task: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The YAML of an lmms-eval task over ``data`` (checked row by row first)."""
    data = Path(data).resolve()
    rows = load_dataset(data, on_bad_row="stop").examples  # a bad row stops here, with its line number
    if not re.fullmatch(r"[A-Za-z0-9_]+", task):
        raise FlashVLMError(f"task name must be letters, digits and underscores; got {task!r}")
    if max_new_tokens < 1:
        raise FlashVLMError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    metrics = ["exact_match"] + sorted({family_metric(row.family) for row in rows if row.family})
    metric_list = "".join(
        f"  - metric: {name}\n    aggregation: mean\n    higher_is_better: true\n" for name in metrics
    )
    quoted = json.dumps  # a JSON string is a valid YAML scalar, whatever the path holds
    return (
        f"# lmms-eval task written by flashvlm from {data.name} ({len(rows)} questions).\n"
        f"task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {quoted(str(data))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {_MODULE}.doc_to_visual\n"
        f"doc_to_text: !function {_MODULE}.doc_to_text\n"
        "doc_to_target: answer\n"
        f"process_results: !function {_MODULE}.process_results\n"
        "generation_kwargs:\n"
        f"  max_new_tokens: {int(max_new_tokens)}\n"
        "  temperature: 0\n"
        "  do_sample: false\n"
        "  until: []\n"
        "metric_list:\n"
        f"{metric_list}"
        "lmms_eval_specific_kwargs:\n"
        "  default:\n"
        f"    image_root: {quoted(str(data.parent))}\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def write_task(data: str | Path, folder: str | Path, task: str, max_new_tokens: int = MAX_NEW_TOKENS) -> Path:
    """Write ``<folder>/<task>.yaml`` for ``data``; pass ``folder`` to lmms-eval's ``--include_path``."""
    text = task_yaml(data, task, max_new_tokens)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashvlm.integrations.lmms_eval.jsonl_task",
        description="Write an lmms-eval task (YAML) over a local short-answer VQA JSONL file.",
    )
    parser.add_argument("data", help="JSONL file: id, image (relative to the file), question, answer[, family]")
    parser.add_argument("--task", required=True, help="task name for lmms-eval's --tasks")
    parser.add_argument("--out", required=True, help="folder to write <task>.yaml into (lmms-eval's --include_path)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = parser.parse_args(argv)
    try:
        path = write_task(args.data, args.out, args.task, args.max_new_tokens)
    except (FlashVLMError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}; run lmms-eval with --tasks {args.task} --include_path {path.parent}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
