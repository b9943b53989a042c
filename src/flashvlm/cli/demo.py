"""``flashvlm demo``: the shipped tiny LLaVA answers a shipped question at full and at a pruned budget."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from ..adapters import adapter_for
from ..errors import FlashVLMError
from ..files import atomic_write
from ..loading import chat_prompt, chat_question, load_image, load_model
from ..patch import prune
from ..selection import get_method, parse_budget
from ..timing import PrefillTimer
from ..vis import draw_kept_tokens, model_view, side_by_side
from .common import add_method_arguments, check_count, check_output_file, check_prompt


def add_parser(subparsers) -> None:
    from ..demo import EXAMPLES_DIR

    parser = subparsers.add_parser(
        "demo",
        help="run the shipped demo model on a scene at full and at a pruned budget, and draw the kept tokens",
        description=(
            "Answer a question about a scene twice, with every visual token and with a budget, "
            "print both answers and prefill times, and write a PNG of the kept tokens."
        ),
    )
    parser.add_argument(
        "--model", help="model folder, hub id or a training run's parts/ folder (default: the shipped demo model)"
    )
    parser.add_argument(
        "--example", default=None, help=f"shipped example name (default: the first in {EXAMPLES_DIR / 'examples.json'})"
    )
    parser.add_argument("--image", help="your own image instead of the shipped scene (needs --prompt)")
    parser.add_argument("--prompt", help="your own question (default: the example's)")
    parser.add_argument("--budget", default="11%", help="visual tokens kept: 28, 0.11 or 11%% (default 11%%)")
    add_method_arguments(parser)
    parser.add_argument("--out", default="flashvlm-demo.png", help="PNG to write (default flashvlm-demo.png)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.set_defaults(run=run)


def shipped_examples() -> list[dict]:
    from ..demo import EXAMPLES_DIR

    return json.loads((EXAMPLES_DIR / "examples.json").read_text())


def _choose_input(args: argparse.Namespace):
    """(image, question, expected answer or None, label) from the arguments."""
    from ..demo import EXAMPLES_DIR

    if args.prompt is not None:
        check_prompt(args.prompt, 1)
    if args.image:
        if args.prompt is None:
            raise FlashVLMError("--image needs --prompt: the question to ask about your image")
        return load_image(args.image), args.prompt, None, Path(args.image).name
    examples = shipped_examples()
    names = [example["name"] for example in examples]
    name = args.example or names[0]
    if name not in names:
        raise FlashVLMError(f"unknown example {name!r}; shipped examples: {', '.join(names)}")
    example = examples[names.index(name)]
    expected = example["answer"] if not args.prompt else None
    return load_image(EXAMPLES_DIR / example["image"]), args.prompt or example["question"], expected, name


def _answer(model, processor, inputs, max_new_tokens: int, **pruning) -> tuple[str, PrefillTimer]:
    """The greedy answer and its prefill timer; ``pruning`` holds the pruned call's ``question``."""
    with PrefillTimer(adapter_for(model).language_model) as timer, torch.no_grad():
        output = model.generate(**inputs, **pruning, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return answer, timer


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before the model is loaded.
    budget = parse_budget(args.budget)
    get_method(args.method)
    check_count("--max-new-tokens", args.max_new_tokens)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise FlashVLMError(f"--out must name a .png file; got {args.out!r}")
    check_output_file("--out", out)
    image, question, expected, label = _choose_input(args)
    from ..demo.model import demo_model_folder

    model, processor = load_model(demo_model_folder(args.model), args.device, args.dtype)
    prompt = chat_prompt(processor, question)
    user_words = chat_question(processor, question)
    inputs = processor(images=[image], text=prompt, return_tensors="pt").to(model.device)

    _answer(model, processor, inputs, 1)  # warm-up: first calls pay one-off costs, not prefill
    full_answer, full = _answer(model, processor, inputs, args.max_new_tokens)
    # The question lets a method with text_tokens="question" (flashvlm:question) find the user's words.
    with prune(model, budget, args.method, tokenizer=processor, timed=True) as pruner:
        _answer(model, processor, inputs, 1, question=user_words)
        pruned_answer, pruned = _answer(model, processor, inputs, args.max_new_tokens, question=user_words)
    selection = pruner.last.images[0]
    selection_ms = 1000.0 * pruner.last_selection_seconds

    print(f"question: {question}" + (f"   (expected: {expected})" if expected else ""))
    print(
        f"full:   {full_answer!r:<12} {selection.num_tokens} visual tokens, prefill {1000 * full.prefill_seconds:.1f} ms"
    )
    share = 100.0 * selection.num_kept / selection.num_tokens
    print(
        f"pruned: {pruned_answer!r:<12} {selection.num_kept} visual tokens ({share:.1f}%, {args.method}), "
        f"prefill {1000 * pruned.prefill_seconds:.1f} ms + vision/selection {selection_ms:.1f} ms"
    )

    grid = selection.grid_shape
    if grid is None:
        raise FlashVLMError(f"the model's {selection.num_tokens} visual tokens do not form a square grid to draw")
    view = model_view(image, int(inputs["pixel_values"].shape[-1]))
    scale = max(1, 448 // view.size[0])
    enlarged = view.resize((view.size[0] * scale, view.size[1] * scale), Image.NEAREST)
    figure = side_by_side(
        [
            (enlarged, f"all {selection.num_tokens} tokens: {full_answer}"),
            (
                draw_kept_tokens(view, selection.keep_indices.tolist(), grid, scale=scale),
                f"{args.method}, {selection.num_kept} tokens: {pruned_answer}",
            ),
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as file:
        figure.save(file, format="PNG")
    print(f"kept tokens of {label}: {out}")
    return 0
