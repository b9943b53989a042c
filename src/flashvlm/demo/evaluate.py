"""Score a model on a benchmark split, unpruned or at a budget, per question family.

    python -m flashvlm.demo.evaluate --split validation --budget 1.0 --budget 28 --budget 14

The answer is the greedy first token after ``ASSISTANT:`` (what ``generate`` would
emit), computed with the model's ordinary forward, so a pruned run goes through exactly
the path ``flashvlm.prune`` gives any LLaVA model. With a budget, each record also says
which objects kept at least one visual token (for the hit rate of queried objects).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..loading import chat_prompt
from ..patch import prune
from ..selection import parse_budget
from .data import example_row, object_hits, split_examples, target_indices
from .scenes import FAMILIES


def evaluate(
    model,
    processor,
    split: str = "validation",
    size: int | None = None,
    seed: int = 0,
    budget=None,
    method: str = "flashvlm",
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict]:
    """One record per question: id, family, answer, prediction, correct, and hits if pruned."""
    examples = split_examples(split, size, seed)
    device = next(model.parameters()).device
    records = []
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc=f"{split} {budget or 'full'}", disable=not progress):
        chunk = examples[start : start + batch_size]
        rows = [example_row(e, f"{split}-{seed}-{start + i:05d}", "") for i, e in enumerate(chunk)]
        inputs = processor(
            images=[e.render() for e in chunk],
            text=[chat_prompt(processor, e.question) for e in chunk],
            return_tensors="pt",
            padding=True,
        ).to(device)
        with torch.no_grad():
            if budget is None:
                logits = model(**inputs).logits[:, -1]
                kept = None
            else:
                # The questions let a method with text_tokens="question" find the user's words.
                with prune(model, budget, method, tokenizer=processor) as pruner:
                    logits = model(**inputs, question=[e.question for e in chunk]).logits[:, -1]
                kept = [image.keep_indices.tolist() for image in pruner.last.images]
        predictions = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for i, (row, prediction) in enumerate(zip(rows, predictions)):
            record = {key: row[key] for key in ("id", "family", "question", "answer")}
            record.update(prediction=prediction, correct=prediction == row["answer"])
            if kept is not None:
                hits = object_hits(row, kept[i])
                targets = target_indices(row)
                record["target_hits"] = [hits[t] for t in targets]
                record["other_hits"] = [hit for t, hit in enumerate(hits) if t not in targets]
            records.append(record)
    return records


def accuracy_by_family(records: list[dict]) -> dict[str, float]:
    """Accuracy per family and overall (the families are balanced in every split)."""
    correct, total = defaultdict(int), defaultdict(int)
    for record in records:
        for key in (record["family"], "overall"):
            total[key] += 1
            correct[key] += record["correct"]
    return {key: round(correct[key] / total[key], 4) for key in (*FAMILIES, "overall") if total[key]}


def hit_rates(records: list[dict], family: str = "attribute") -> dict[str, float]:
    """How often a queried object vs. another object keeps at least one token."""
    queried = [hit for r in records if r["family"] == family for hit in r.get("target_hits", [])]
    others = [hit for r in records if r["family"] == family for hit in r.get("other_hits", [])]
    rate = lambda hits: round(sum(hits) / len(hits), 4) if hits else float("nan")  # noqa: E731
    return {"queried": rate(queried), "others": rate(others)}


def main(argv: list[str] | None = None) -> int:
    from ..loading import load_model
    from . import MODEL_DIR

    parser = argparse.ArgumentParser(prog="python -m flashvlm.demo.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(MODEL_DIR), help="model folder (default: the shipped demo model)")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--size", type=int, help="questions (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", action="append", help="1.0 = unpruned; 28, 0.11, 11%%; repeat for several")
    parser.add_argument("--method", default="flashvlm")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    results = {}
    for text in args.budget or ["1.0"]:
        budget = parse_budget(text)
        records = evaluate(
            model, processor, args.split, args.size, args.seed, None if budget == 1.0 else budget, args.method
        )
        results[text] = {"accuracy": accuracy_by_family(records)}
        if budget != 1.0:
            results[text]["attribute_hit_rate"] = hit_rates(records)
        print(text, json.dumps(results[text]))
    if args.out:
        args.out.write_text(json.dumps({"split": args.split, "method": args.method, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
