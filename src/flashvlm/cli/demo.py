"""``flashvlm demo``: the demo model answers each shipped question unpruned, with FlashVLM and with a text-agnostic method."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..adapters import adapter_for
from ..errors import FlashVLMError
from ..eval.scoring import score_answer
from ..files import atomic_write
from ..loading import chat_prompt, chat_question, load_image, load_model
from ..patch import prune
from ..selection import get_method, parse_budget
from ..timing import PrefillTimer
from ..vis import draw_kept_tokens, model_view, side_by_side, stacked
from .common import add_method_arguments, check_count, check_output_file, check_prompt

#: What the shipped demo model's answers are worth, printed under them (docs/demo.md has the measurements).
SHIPPED_MODEL_NOTE = (
    "note: the shipped demo model was trained for 108 minutes on a 2-core CPU and answers 68.0 % of the test "
    "split unpruned (chance about 39 %): 97 % of colour and shape questions and 88 % of existence questions, "
    "but counting and relations near chance; the kept tokens show what each method selects (docs/demo.md)"
)


def add_parser(subparsers) -> None:
    from ..demo import EXAMPLES_DIR

    parser = subparsers.add_parser(
        "demo",
        help="answer the shipped questions unpruned, with a method and with a text-agnostic baseline; draw the kept tokens",
        description=(
            "Answer each shipped question (or yours) with every visual token, with --method and with --baseline "
            "at one budget; print the answers, right or wrong, and the prefill times, and write a PNG of the kept tokens."
        ),
    )
    parser.add_argument(
        "--model", help="model folder, hub id or a training run's parts/ folder (default: the shipped demo model)"
    )
    parser.add_argument(
        "--example",
        default=None,
        help=f"one shipped example by name (default: all of {EXAMPLES_DIR / 'examples.json'})",
    )
    parser.add_argument("--image", help="your own image instead of the shipped scenes (needs --prompt)")
    parser.add_argument("--prompt", help="your own question (default: the example's)")
    parser.add_argument("--budget", default="11%", help="visual tokens kept: 28, 0.11 or 11%% (default 11%%)")
    add_method_arguments(parser)
    parser.add_argument(
        "--baseline",
        default="vispruner",
        help="a second method at the same budget, text-agnostic by default (vispruner); none: leave it out",
    )
    parser.add_argument("--out", default="flashvlm-demo.png", help="PNG to write (default flashvlm-demo.png)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.set_defaults(run=run)


def shipped_examples() -> list[dict]:
    from ..demo import EXAMPLES_DIR

    return json.loads((EXAMPLES_DIR / "examples.json").read_text())


@dataclass
class Question:
    image: Image.Image
    text: str
    expected: str | None  # None: the user's own question, not marked
    label: str


@dataclass
class Answer:
    method: str  # "none": every visual token
    text: str
    tokens: int  # visual tokens the language model read
    total: int  # visual tokens of the image
    prefill_ms: float
    selection_ms: float | None  # vision and selection, pruned runs only
    keep_indices: list[int] | None
    grid: tuple[int, int] | None


def _questions(args: argparse.Namespace) -> list[Question]:
    from ..demo import EXAMPLES_DIR

    if args.prompt is not None:
        check_prompt(args.prompt, 1)
    if args.image:
        if args.prompt is None:
            raise FlashVLMError("--image needs --prompt: the question to ask about your image")
        return [Question(load_image(args.image), args.prompt, None, Path(args.image).name)]
    examples = shipped_examples()
    names = [example["name"] for example in examples]
    if args.example is not None and args.example not in names:
        raise FlashVLMError(f"unknown example {args.example!r}; shipped examples: {', '.join(names)}")
    chosen = [example for example in examples if args.example in (None, example["name"])]
    return [
        Question(
            load_image(EXAMPLES_DIR / example["image"]),
            args.prompt or example["question"],
            None if args.prompt else example["answer"],
            example["name"],
        )
        for example in chosen
    ]


def _generate(model, processor, inputs, max_new_tokens: int, **pruning) -> tuple[str, PrefillTimer]:
    """The greedy answer and its prefill timer; ``pruning`` holds the pruned call's ``question``."""
    with PrefillTimer(adapter_for(model).language_model) as timer, torch.no_grad():
        output = model.generate(**inputs, **pruning, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return answer, timer


def _answer(model, processor, question: Question, inputs, method: str, budget, max_new_tokens: int) -> Answer:
    """One method's answer to one question's ``inputs`` (``none``: unpruned), after a one-token warm-up."""
    if method == "none":
        _generate(model, processor, inputs, 1)  # first calls pay one-off costs, not prefill
        text, timer = _generate(model, processor, inputs, max_new_tokens)
        tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
        return Answer("none", text, tokens, tokens, 1000 * timer.prefill_seconds, None, None, None)
    # The question lets a method with text_tokens="question" (flashvlm:question) find the user's words.
    user_words = chat_question(processor, question.text)
    with prune(model, budget, method, tokenizer=processor, timed=True) as pruner:
        _generate(model, processor, inputs, 1, question=user_words)
        text, timer = _generate(model, processor, inputs, max_new_tokens, question=user_words)
    selection = pruner.last.images[0]
    return Answer(
        method,
        text,
        selection.num_kept,
        selection.num_tokens,
        1000 * timer.prefill_seconds,
        1000 * pruner.last_selection_seconds,
        selection.keep_indices.tolist(),
        selection.grid_shape,
    )


def _mark(answer: Answer, expected: str | None) -> str:
    if expected is None:
        return ""
    return "right" if score_answer(answer.text, expected) else "wrong"


def _describe(answer: Answer) -> str:
    if answer.method == "none":
        return f"all {answer.total} tokens"
    return f"{answer.method}, {answer.tokens} tokens ({100 * answer.tokens / answer.total:.0f}%)"


def _print(question: Question, answers: list[Answer]) -> None:
    expected = f"   (expected: {question.expected})" if question.expected else ""
    print(f"[{question.label}] {question.text}{expected}")
    for answer in answers:
        timing = f"prefill {answer.prefill_ms:6.1f} ms"
        if answer.selection_ms is not None:
            timing += f" + vision/selection {answer.selection_ms:.1f} ms"
        print(f"  {_describe(answer):<28} {answer.text!r:<14} {_mark(answer, question.expected):<6} {timing}")


def _figure(question: Question, answers: list[Answer], size: int) -> tuple[Image.Image, str]:
    """One row of panels (the image, then each pruned run's kept tokens) under the question."""
    view = model_view(question.image, size)
    scale = max(1, 448 // view.size[0])
    panels = []
    for answer in answers:
        mark = _mark(answer, question.expected)
        label = f"{_describe(answer)}: {answer.text}" + (f" ({mark})" if mark else "")
        if answer.keep_indices is None:
            panels.append((view.resize((view.size[0] * scale, view.size[1] * scale), Image.NEAREST), label))
            continue
        if answer.grid is None:
            raise FlashVLMError(f"the model's {answer.total} visual tokens do not form a square grid to draw")
        panels.append((draw_kept_tokens(view, answer.keep_indices, answer.grid, scale=scale), label))
    expected = f"   expected: {question.expected}" if question.expected else ""
    return side_by_side(panels), f"{question.label}: {question.text}{expected}"


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before the model is loaded.
    budget = parse_budget(args.budget)
    methods = ["none", args.method]
    get_method(args.method)
    if args.baseline != "none":
        get_method(args.baseline)
        methods.append(args.baseline)
    check_count("--max-new-tokens", args.max_new_tokens)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise FlashVLMError(f"--out must name a .png file; got {args.out!r}")
    check_output_file("--out", out)
    questions = _questions(args)
    from ..demo.model import demo_model_folder

    model, processor = load_model(demo_model_folder(args.model), args.device, args.dtype)
    rows = []
    for question in questions:
        prompt = chat_prompt(processor, question.text)
        inputs = processor(images=[question.image], text=prompt, return_tensors="pt").to(model.device)
        answers = [_answer(model, processor, question, inputs, m, budget, args.max_new_tokens) for m in methods]
        _print(question, answers)
        rows.append(_figure(question, answers, int(inputs["pixel_values"].shape[-1])))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as file:
        stacked(rows).save(file, format="PNG")
    print(f"kept tokens: {out}")
    if args.model is None:
        print(SHIPPED_MODEL_NOTE)
    return 0
