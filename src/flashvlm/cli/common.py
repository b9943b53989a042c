"""Arguments and checks shared by the subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import FlashVLMError
from ..files import check_writable_folder, write_target
from ..loading import IMAGE_PLACEHOLDER
from ..selection import Budget, available_methods, parse_budget


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face hub id or local model folder")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, float16, bfloat16")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        default="flashvlm",
        help=f"selection method, optionally with a preset as NAME:PRESET; one of {', '.join(available_methods())}",
    )


def check_count(option: str, value: int | None, low: int = 1) -> None:
    """Refuse an integer option below ``low`` (None means the option was not given)."""
    if value is not None and value < low:
        raise FlashVLMError(f"{option} must be an integer >= {low}; got {value}")


def without_repeats(command: str, items: list[str], keys: list, what: str) -> list[str]:
    """``items`` without repeats (two items repeat when their ``keys`` are equal), in order; a note names the dropped."""
    kept, seen, dropped = [], set(), []
    for item, key in zip(items, keys):
        if key in seen:
            dropped.append(item)
            continue
        seen.add(key)
        kept.append(item)
    if dropped:
        print(f"flashvlm {command}: note: {what} {', '.join(dropped)} repeated; each runs once", file=sys.stderr)
    return kept


def budget_key(budget: Budget) -> tuple[type, Budget]:
    """What tells budgets apart: 1 (one token) and 1.0 (every token) are equal numbers but two budgets."""
    return (type(budget), budget)


def parse_budgets(command: str, texts: list[str]) -> dict[str, Budget]:
    """Budget as written -> parsed, without repeats: "64" and "64.0", or "25%" and "0.25", are one (the first kept)."""
    parsed = {text.strip(): parse_budget(text) for text in texts}
    kept = without_repeats(command, list(parsed), [budget_key(value) for value in parsed.values()], "budget")
    return {text: parsed[text] for text in kept}


def check_prompt(prompt: str, num_images: int, image_token: str = IMAGE_PLACEHOLDER) -> None:
    """Refuse an empty prompt, and one whose image placeholders do not match the images given.

    A prompt without placeholders is fine: the chat template puts the images before it.
    """
    if not prompt.strip():
        raise FlashVLMError(f"--prompt is empty; got {prompt!r}: ask a question about the image")
    placeholders = prompt.count(image_token)
    if placeholders and placeholders != num_images:
        images = f"{num_images} image{'s' if num_images != 1 else ''}"
        raise FlashVLMError(
            f"--prompt has {placeholders} {image_token} placeholder{'s' if placeholders != 1 else ''} for {images}; "
            f"write one {image_token} per --image, or none to have the images placed before the question"
        )


def check_output_file(option: str, path: str | os.PathLike) -> None:
    """Refuse an output file that cannot be written (a folder, or in a read-only folder) before any work.

    Missing folders above it are fine: they are created when the file is written. A symbolic
    link is checked where it points (the file written there), and its folder must exist.
    """
    path = Path(path)
    if path.is_symlink():
        target = write_target(path)
        if not target.parent.is_dir():
            raise FlashVLMError(f"{option} {path} links to {target}, whose folder does not exist; create it first")
        path = target
    if path.is_dir():
        raise FlashVLMError(f"{option} {path} is a folder; name a file")
    check_writable_folder(_nearest_folder_above(option, path))


def check_output_folder(option: str, path: str | os.PathLike) -> None:
    """Refuse an output folder that cannot be written (a file, or under one) before any work.

    It is created if missing, but the folder above it must exist: a typo there is more
    likely than a wish for a new tree.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FlashVLMError(
            f"{option} {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
            "create that folder, or name another"
        )
    if path.exists() and not path.is_dir():
        raise FlashVLMError(f"{option} {path} is a file; name a folder (it is created if missing)")
    folder = path if path.exists() else _nearest_folder_above(option, path)
    if folder != path and folder != path.absolute().parent:
        raise FlashVLMError(f"{option} {path}: the folder {path.parent} does not exist; create it first")
    check_writable_folder(folder)


def _nearest_folder_above(option: str, path: Path) -> Path:
    """The nearest existing folder above ``path``; refused when what exists there is a file."""
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise FlashVLMError(f"{option} {path}: {existing} is a file, not a folder")
    return existing
