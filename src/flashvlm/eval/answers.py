"""Batched generation over a dataset with one method and budget attached, row by row results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import FlashVLMError, QuestionNotFoundError
from ..loading import chat_prompt, load_image
from ..patch import prune
from ..selection import Budget, TokenSelector
from ..timing import PrefillTimer
from .dataset import Example
from .scoring import score_answer

#: What lmms-eval appends to short-answer VQA questions for LLaVA-1.5.
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."


@dataclass
class RowResult:
    """One example under one method and budget."""

    id: str
    prediction: str
    answer: str
    correct: bool
    family: str | None
    visual_tokens: list[int]  # tokens kept per image, in prompt order
    kept_indices: list[list[int]]  # kept token positions per image (raster order)
    selection_seconds: float  # vision encoding + selection, this row's share of its batch
    prefill_seconds: float  # language-model prefill, this row's share of its batch


def answer_questions(
    model,
    processor,
    examples: Sequence[Example],
    method: str | TokenSelector,
    budget: Budget,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    prompt_suffix: str = SHORT_ANSWER_PROMPT,
    progress: bool = True,
    label: str | None = None,
    on_batch: Callable[[list[RowResult]], None] | None = None,
    **params,
) -> list[RowResult]:
    """Answer every example with ``method`` at ``budget`` attached; greedy decoding, left padding.

    Times are measured per batch (device-synchronised) and shared equally among its rows.
    ``label`` names the run in the progress bar (default ``"METHOD @ BUDGET"``, and
    ``"none (unpruned)"`` for the reference). ``on_batch`` is called with each batch's
    results as soon as they exist, so a caller can keep them before the next batch runs.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends to the right end of every row
    results: list[RowResult] = []
    batches = [examples[start : start + batch_size] for start in range(0, len(examples), batch_size)]
    try:
        # The tokenizer and each row's question let a method with text_tokens="question" find the user's words.
        with prune(model, budget, method, tokenizer=processor, timed=True, **params) as pruner, torch.no_grad():
            if label is None:
                name = pruner.selector.name
                label = (
                    "none (unpruned)" if name == "none" else f"{method if isinstance(method, str) else name} @ {budget}"
                )
            for batch in tqdm(batches, desc=label, unit="batch", disable=not progress, leave=False):
                prompts = [_prompt(processor, example, prompt_suffix) for example in batch]
                images = [load_image(path) for example in batch for path in example.images]
                inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt").to(model.device)
                with PrefillTimer(pruner.adapter.language_model) as timer:
                    try:
                        output = model.generate(
                            **inputs,
                            question=[example.question for example in batch],
                            max_new_tokens=max_new_tokens,
                            do_sample=False,
                            pad_token_id=tokenizer.pad_token_id,
                        )
                    except QuestionNotFoundError as error:
                        example = batch[error.row]
                        raise QuestionNotFoundError(
                            example.question,
                            error.row,
                            f"dataset line {example.line} (id {example.id!r})",
                            "the chat template did not keep its words; use a method whose text_tokens is not 'question'",
                        ) from None
                answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                batch_results = _row_results(batch, answers, pruner, timer)
                results.extend(batch_results)
                if on_batch is not None:
                    on_batch(batch_results)
    finally:
        tokenizer.padding_side = padding_side
    return results


def _prompt(processor, example: Example, prompt_suffix: str) -> str:
    """The example's chat prompt; an error names its dataset line and id."""
    try:
        return chat_prompt(processor, example.question + prompt_suffix, len(example.images))
    except FlashVLMError as error:
        raise FlashVLMError(f"dataset line {example.line} (id {example.id!r}): {error}") from None


def _row_results(batch: Sequence[Example], answers: list[str], pruner, timer: PrefillTimer) -> list[RowResult]:
    images_by_row: list[list] = [[] for _ in batch]
    for image in pruner.last.images:
        images_by_row[image.batch_index].append(image)
    selection_share = pruner.last_selection_seconds / len(batch)
    prefill_share = (timer.prefill_seconds or 0.0) / len(batch)
    rows = []
    for example, answer, images in zip(batch, answers, images_by_row):
        prediction = answer.strip()
        rows.append(
            RowResult(
                id=example.id,
                prediction=prediction,
                answer=example.answer,
                correct=score_answer(prediction, example.answer, example.scoring),
                family=example.family,
                visual_tokens=[image.num_kept for image in images],
                kept_indices=[image.keep_indices.tolist() for image in images],
                selection_seconds=selection_share,
                prefill_seconds=prefill_share,
            )
        )
    return rows
