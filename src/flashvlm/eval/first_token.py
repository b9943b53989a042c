"""First-token scoring: is the greedy first answer token the answer's first token?

One forward per batch and no decoding loop, so a training run can score a few hundred
validation questions every checkpoint. For single-word answers it agrees with
:func:`flashvlm.eval.answer_questions` (which generates and compares normalised text) whenever
the model ends its answer after the word; use that for reported numbers. Inside
``flashvlm.prune(model, ...)`` it scores the pruned model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..loading import chat_prompt


def first_token_correct(
    model,
    processor,
    images: Sequence,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 16,
    prompt_suffix: str = "",
) -> list[bool]:
    """Per question: does the argmax of the logits after the prompt equal the answer's first token?

    ``images`` are PIL images, one per question; prompts are the model's chat format, left-padded.
    """
    tokenizer = processor.tokenizer
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the last position of every row is where its answer starts
    correct: list[bool] = []
    try:
        for start in range(0, len(questions), batch_size):
            stop = start + batch_size
            prompts = [chat_prompt(processor, question + prompt_suffix) for question in questions[start:stop]]
            inputs = processor(images=list(images[start:stop]), text=prompts, padding=True, return_tensors="pt")
            with torch.no_grad():
                predicted = model(**inputs.to(model.device)).logits[:, -1].argmax(-1).tolist()  # (B,)
            expected = [tokenizer(answer, add_special_tokens=False)["input_ids"][0] for answer in answers[start:stop]]
            correct += [guess == truth for guess, truth in zip(predicted, expected, strict=True)]
    finally:
        tokenizer.padding_side = padding_side
    return correct
