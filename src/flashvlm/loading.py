"""Loading models, processors and images, with errors that say what went wrong."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .adapters import supported_architectures
from .errors import FlashVLMError, UnsupportedModelError


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, or raise a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise FlashVLMError(f"cannot read image {path}: not a readable image file ({error})") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise FlashVLMError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FlashVLMError(f"device {device!r} was requested but no CUDA device is available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise FlashVLMError(f"unknown dtype {dtype!r}; use auto, {', '.join(choices)}")
    return choices[dtype]


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto"):
    """Load a supported VLM and its processor with ``from_pretrained`` (hub id or local folder).

    The architecture is checked from the config before any weights are read.
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    local = Path(name_or_path)
    if (local.exists() or name_or_path.startswith((".", "/"))) and not (local / "config.json").is_file():
        raise FileNotFoundError(f"no model folder with a config.json at {name_or_path}")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise FlashVLMError(f"could not load a model config from {name_or_path!r}: {error}") from None
    architectures = [name for name in (config.architectures or []) if name in supported_architectures()]
    if not architectures:
        raise UnsupportedModelError(
            f"{name_or_path} is a {', '.join(config.architectures or [config.model_type])}; "
            f"flashvlm supports: {', '.join(supported_architectures())}"
        )
    torch_device = resolve_device(device)
    model_class = getattr(transformers, architectures[0])
    model = model_class.from_pretrained(name_or_path, dtype=resolve_dtype(dtype, torch_device))
    processor = AutoProcessor.from_pretrained(name_or_path)
    return model.to(torch_device).eval(), processor


def chat_prompt(processor, question: str, num_images: int = 1) -> str:
    """The model's own chat format for ``num_images`` images followed by ``question``.

    A question that already contains the processor's image token is used as it is.
    """
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in question:
        return question
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return "USER: " + image_token * num_images + f"\n{question} ASSISTANT:"
