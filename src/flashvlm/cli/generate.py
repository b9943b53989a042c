"""``flashvlm generate``: answer one question about one image with a pruned model."""

from __future__ import annotations

import argparse

import torch

from ..adapters import adapter_for
from ..loading import IMAGE_PLACEHOLDER, chat_prompt, chat_question, load_image, load_model
from ..patch import prune
from ..selection import get_method, parse_budget
from ..timing import PrefillTimer
from .common import add_method_arguments, add_model_arguments, check_count, check_prompt


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a question about an image, keeping only a budget of visual tokens",
        description="Answer a question about an image, keeping only a budget of visual tokens.",
    )
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, action="append", help="image file (repeat for several images)")
    parser.add_argument(
        "--prompt",
        required=True,
        help="the question; the model's chat template is applied, with the images before the question, or where "
        "the prompt has <image> placeholders (one per --image; the model's image token); a prompt already in the "
        "chat format (ending with the template's answer marker, e.g. ASSISTANT:) is used as given",
    )
    parser.add_argument("--budget", default="64", help="visual tokens kept per image: 64, 0.25 or 25%% (default 64)")
    add_method_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before the model is loaded.
    budget = parse_budget(args.budget)
    get_method(args.method)
    check_count("--max-new-tokens", args.max_new_tokens)
    check_prompt(args.prompt, len(args.image))
    images = [load_image(path) for path in args.image]
    model, processor = load_model(args.model, args.device, args.dtype)
    check_prompt(args.prompt, len(images), getattr(processor, "image_token", IMAGE_PLACEHOLDER))
    prompt = chat_prompt(processor, args.prompt, len(images))
    inputs = processor(images=images, text=prompt, return_tensors="pt").to(model.device)
    adapter = adapter_for(model)
    pruning = prune(model, budget, args.method, tokenizer=processor, timed=True)
    with pruning as pruner, PrefillTimer(adapter.language_model) as timer, torch.no_grad():
        # The question lets a method with text_tokens="question" (flashvlm:question) find the user's words.
        output = model.generate(
            **inputs,
            question=chat_question(processor, args.prompt),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
        )
    answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(f"answer: {answer}")
    for number, image in enumerate(pruner.last.images, start=1):
        share = 100.0 * image.num_kept / image.num_tokens
        print(f"image {number}: kept {image.num_kept} of {image.num_tokens} visual tokens ({share:.1f}%)")
    selection_ms = 1000.0 * pruner.last_selection_seconds
    prefill_ms = 1000.0 * timer.prefill_seconds
    print(
        f"prefill: {selection_ms + prefill_ms:.1f} ms (vision + selection {selection_ms:.1f} ms, "
        f"language model {prefill_ms:.1f} ms over {timer.prefill_length} positions)"
    )
    return 0
