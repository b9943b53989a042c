"""Loading models, processors and images, with errors that say what went wrong."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .adapters import supported_architectures
from .errors import FlashVLMError, UnsupportedModelError, require_extra

#: The placeholder a prompt may carry where an image goes (LLaVA's; other processors have their own).
IMAGE_PLACEHOLDER = "<image>"


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB, upright, or raise a clear error for a missing or unreadable file.

    The EXIF orientation is applied (as transformers' own ``load_image`` does: a phone photo
    would otherwise reach the model sideways), and images of more than 8 bits per channel are
    scaled down to 8 bits rather than clipped.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as image:
            return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise FlashVLMError(f"image {path} is too large to open safely: {error}") from None
    except FlashVLMError as error:
        raise FlashVLMError(f"image {path} {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise FlashVLMError(f"cannot read image {path}: not a readable image file ({error})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow's own conversion clips 16-bit grayscale (``I;16``) at 255, which turns
    almost every pixel white; those values are scaled from 0..65535 to 0..255 instead. A 32-bit
    ``I`` image is read the same way when its values exceed 8 bits (Pillow opens some 16-bit
    files as ``I``).

    A float image (``F``) is read as 0..1 when every value lies in [0, 1] (Pillow would clip
    those to black), else as 0..255; values outside both ranges, NaN or infinity raise
    :class:`FlashVLMError` ("has float pixels ...", to follow the image's name).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image).astype(np.float64)  # (H, W)
        if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
            pixels = pixels / 257.0
        image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        pixels = np.asarray(image).astype(np.float64)  # (H, W)
        if not np.isfinite(pixels).all():
            raise FlashVLMError("has float pixels that are not finite (NaN or infinity)")
        low, high = (pixels.min(), pixels.max()) if pixels.size else (0.0, 0.0)
        if low < 0 or high > 255:
            raise FlashVLMError(f"has float pixels from {low:g} to {high:g}; expected values in 0..1 or 0..255")
        if high <= 1:
            pixels = pixels * 255.0
        image = Image.fromarray(pixels.round().astype(np.uint8), mode="L")
    return image.convert("RGB")


def check_device(name: str) -> torch.device:
    """The torch device ``name`` names, refused unless this machine has it.

    ``load_model`` calls it before reading any weights, so ``--device mps`` on a machine
    without MPS fails at once, not after the model has loaded.
    """
    accepted = "use auto, cpu, cuda, cuda:N or mps"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise FlashVLMError(f"unknown device {name!r}; {accepted}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FlashVLMError(f"device {name!r} was requested but this machine has no CUDA device; use auto or cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise FlashVLMError(
                f"device {name!r} does not exist: this machine has CUDA devices cuda:0..cuda:{count - 1}"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise FlashVLMError(
                f"device {name!r} was requested but this machine has no Apple MPS device; use auto or cpu"
            )
    elif device.type != "cpu":
        raise FlashVLMError(f"unsupported device {name!r}; {accepted}")
    return device


#: The name the bench commands import; the same function.
resolve_device = check_device


#: Every spelling ``resolve_dtype`` accepts besides auto, torch's name first.
DTYPE_SPELLINGS = {
    torch.float32: ("float32", "fp32", "float"),
    torch.float16: ("float16", "fp16", "half"),
    torch.bfloat16: ("bfloat16", "bf16"),
}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype ``dtype`` names on ``device``: auto is bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    for torch_dtype, spellings in DTYPE_SPELLINGS.items():
        if dtype in spellings:
            return torch_dtype
    accepted = ", ".join(spelling for spellings in DTYPE_SPELLINGS.values() for spelling in spellings)
    raise FlashVLMError(f"unknown dtype {dtype!r}; use auto, {accepted}")


#: Weight files ``from_pretrained`` reads, single-file and sharded (the index lists the shards).
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: Files a saved processor leaves (one of each group is enough).
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_model_folder(folder: str | os.PathLike) -> None:
    """Raise :class:`FlashVLMError` naming what a local model folder lacks, before anything loads.

    A folder needs a config.json, complete weights (every shard its index lists; safetensors
    files as long as their header says) and processor and tokenizer files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FlashVLMError(f"no model folder at {folder}")
    if not (folder / "config.json").is_file():
        raise FlashVLMError(
            f"{folder} has no config.json: not a Hugging Face model folder (save one with save_pretrained)"
        )
    for name, group in (("processor", _PROCESSOR_FILES), ("tokenizer", _TOKENIZER_FILES)):
        if not any((folder / file).is_file() for file in group):
            raise FlashVLMError(
                f"{folder} has no {name} files ({' or '.join(group)}): save the processor there with "
                "processor.save_pretrained"
            )
    weights = [folder / file for file in _WEIGHT_FILES if (folder / file).is_file()]
    for index in (folder / file for file in _WEIGHT_INDEXES):
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError):
                raise FlashVLMError(f"{index} is not a readable weight index (no weight_map)") from None
            missing = [shard for shard in shards if not (folder / shard).is_file()]
            if missing:
                raise FlashVLMError(f"{folder} is missing weight shard(s) {', '.join(missing)} listed in {index.name}")
            weights += [folder / shard for shard in shards]
    if not weights:
        raise FlashVLMError(f"{folder} has no weights ({', '.join(_WEIGHT_FILES + _WEIGHT_INDEXES)})")
    for path in weights:
        if path.suffix == ".safetensors":
            check_safetensors_complete(path)


def check_safetensors_complete(path: Path) -> None:
    """Raise :class:`FlashVLMError` when a safetensors file is shorter than its header says.

    The file is an 8-byte little-endian header length, a JSON header giving each tensor's
    byte range, then the data; only the header is read.
    """
    size = path.stat().st_size
    try:
        with path.open("rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if size < 8 or header_length > size - 8:
                raise ValueError
            header = json.loads(file.read(header_length))
        data_length = max(
            (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0
        )
    except (ValueError, KeyError, TypeError, IndexError):
        raise FlashVLMError(
            f"{path} is truncated or not a safetensors file ({size} bytes; header unreadable)"
        ) from None
    expected = 8 + header_length + data_length
    if size < expected:
        raise FlashVLMError(f"{path} is truncated: {size} of {expected} bytes (copy or download it again)")


def one_line(error: BaseException) -> str:
    """An exception's whole message on one line: transformers' errors run to several, and the
    reason can be in any of them (a tokenizer's is in its last)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


def model_architecture(config, name_or_path: str) -> str:
    """The supported model class a config describes, or :class:`UnsupportedModelError` saying why not.

    A config without ``architectures`` is read by its ``model_type``, as transformers'
    ``AutoModelForImageTextToText`` reads it.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    supported = supported_architectures()
    declared = list(config.architectures or [])
    if not declared:
        inferred = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type)
        if inferred in supported:
            return inferred
        raise UnsupportedModelError(
            f"{name_or_path}: config.json names no architectures, and its model_type {config.model_type!r} is not "
            f"one flashvlm supports; flashvlm supports: {', '.join(supported)}"
        )
    matches = [name for name in declared if name in supported]
    if not matches:
        raise UnsupportedModelError(
            f"{name_or_path} is a {', '.join(declared)}; flashvlm supports: {', '.join(supported)}"
        )
    return matches[0]


#: Packages a processor class needs beyond flashvlm's core dependencies, and the extra that brings them.
PROCESSOR_EXTRAS = {"SmolVLMProcessor": ("num2words", "smolvlm")}


def load_processor(name_or_path: str, config):
    """The model's processor. Without torchvision, a processor that holds a video processor
    (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL, SmolVLM) is loaded without
    it: images work, videos are refused with a message (see :mod:`flashvlm._torchvision_compat`).
    A processor whose package is missing (SmolVLM's num2words) is refused in one line that
    says what to install."""
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    from ._torchvision_compat import needs_torchvision, without_video_processor

    processor_class = PROCESSOR_MAPPING.get(type(config), None)
    package, extra = PROCESSOR_EXTRAS.get(getattr(processor_class, "__name__", None), (None, None))
    if package is not None:
        require_extra(extra, package, purpose=f"the processor of {name_or_path} ({processor_class.__name__})")
    if processor_class is not None and needs_torchvision(processor_class):
        loader = without_video_processor(processor_class)
    else:
        loader = AutoProcessor
    try:
        return loader.from_pretrained(name_or_path)
    except (OSError, ValueError, ImportError, KeyError) as error:
        raise FlashVLMError(f"could not load the processor of {name_or_path}: {one_line(error)}") from None


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto"):
    """Load a supported VLM and its processor with ``from_pretrained`` (hub id or local folder).

    Everything that can be checked is checked before any weights are read, in this order: the
    device (:func:`check_device`), the architecture the config names, the folder's files
    (:func:`check_model_folder`) and the processor (:func:`load_processor`). Each failure is
    one :class:`FlashVLMError` line naming the folder or hub id and what is wrong. After the
    weights load, a tensor the checkpoint lacks or one the model has no place for is an error
    naming them (:func:`check_weights_loaded`).
    """
    import transformers
    from transformers import AutoConfig

    torch_device = check_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    name_or_path = str(name_or_path)
    local = Path(name_or_path).expanduser()
    is_local = local.exists() or name_or_path.startswith((".", "/", "~"))
    if is_local:
        if not (local / "config.json").is_file():
            raise FlashVLMError(f"no model folder with a config.json at {name_or_path}")
        name_or_path = str(local)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as error:
        where = "" if is_local else " (not a local folder, and not available from the Hugging Face Hub)"
        raise FlashVLMError(f"could not load a model config from {name_or_path!r}{where}: {one_line(error)}") from None
    model_class = getattr(transformers, model_architecture(config, name_or_path))
    if is_local:
        check_model_folder(local)  # after the architecture: an unsupported model is the first thing to say
    processor = load_processor(name_or_path, config)
    try:
        model, loading_info = model_class.from_pretrained(name_or_path, dtype=torch_dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise FlashVLMError(f"could not load the weights of {name_or_path}: {one_line(error)}") from None
    check_weights_loaded(name_or_path, loading_info)
    return model.to(torch_device).eval(), processor


def _names(keys, shown: int = 8) -> str:
    names = sorted(keys)
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_weights_loaded(name_or_path: str, loading_info: dict) -> None:
    """Raise :class:`FlashVLMError` naming the tensors a checkpoint lacks or holds in excess.

    ``from_pretrained`` only reports them (a missing tensor keeps its random initialisation),
    so an incomplete checkpoint would otherwise answer with random weights. ``loading_info`` is
    what ``from_pretrained(..., output_loading_info=True)`` returns beside the model.
    """
    missing = loading_info.get("missing_keys") or ()
    if missing:
        raise FlashVLMError(
            f"{name_or_path} lacks weights for {len(missing)} of the model's tensors ({_names(missing)}): "
            "they would be random; use a complete checkpoint"
        )
    unexpected = loading_info.get("unexpected_keys") or ()
    if unexpected:
        weights = f"{len(unexpected)} weight{'s' if len(unexpected) != 1 else ''}"
        raise FlashVLMError(
            f"{name_or_path} holds {weights} the model has no place for ({_names(unexpected)}): "
            "is it a checkpoint of another architecture or version?"
        )
    errors = loading_info.get("error_msgs") or ()
    if errors:
        raise FlashVLMError(f"could not load the weights of {name_or_path}: {one_line(errors[0])}")


def chat_prompt(processor, question: str, num_images: int = 1) -> str:
    """The model's own chat format for ``num_images`` images followed by ``question``.

    A question that contains the processor's image token places the images itself: the chat
    template is still applied, and each placeholder (with the whitespace after it) becomes
    what the template writes for one image, where the user put it. A question already in the
    chat format (it ends with the template's answer marker, "ASSISTANT:" for LLaVA-1.5) is
    used as given; it must then place every image itself.

    The prompt never starts with the tokenizer's BOS token when the processor adds one itself
    (a template that writes ``{{ bos_token }}``, a user who typed ``<s>``): the model would
    read two.
    """
    return _without_added_bos(processor, _chat_text(processor, _without_added_bos(processor, question), num_images))


def _without_added_bos(processor, text: str) -> str:
    """``text`` less a leading BOS token that the processor's tokenizer adds itself."""
    tokenizer = getattr(processor, "tokenizer", processor)
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or not text.startswith(bos) or bos_id is None:
        return text
    added = tokenizer("a")["input_ids"][:1] == [bos_id]
    return text[len(bos) :] if added else text


def _chat_text(processor, question: str, num_images: int) -> str:
    image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
    has_template = bool(getattr(processor, "chat_template", None))
    user_marker, answer_marker = chat_markers(processor)
    if question.rstrip().endswith(answer_marker):
        placeholders = question.count(image_token)
        if placeholders != num_images:
            raise FlashVLMError(
                f"the prompt {_shown(question)} is already in the chat format (it ends with {answer_marker!r}) but "
                f"has {placeholders} {image_token} for {num_images} image(s): place one {image_token} per image, "
                "or give the question alone"
            )
        return question
    if question.lstrip().startswith(user_marker):
        raise FlashVLMError(
            f"the prompt {_shown(question)} starts a chat turn ({user_marker!r}) but does not end with the answer "
            f"marker {answer_marker!r}: give the whole chat format, or the question alone"
        )
    placeholders = question.count(image_token)
    if placeholders and placeholders != num_images:
        raise FlashVLMError(
            f"the prompt {_shown(question)} has {placeholders} {image_token} for {num_images} image(s): place one "
            f"{image_token} per image, or none to have the images placed before the question"
        )
    if not placeholders:
        if has_template:
            content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
            return _render_chat(processor, content)
        return "USER: " + image_token * num_images + f"\n{question} ASSISTANT:"
    pieces = re.split(re.escape(image_token) + r"\s*", question)
    if not has_template:
        return "USER: " + f"{image_token}\n".join(pieces) + " ASSISTANT:"
    return _render_chat(processor, [{"type": "text", "text": _TEXT_MARK}]).replace(
        _TEXT_MARK, template_image_block(processor).join(pieces)
    )


def chat_question(processor, prompt: str) -> str:
    """The user's words in ``prompt``: the text between the chat markers of a prompt already in
    the chat format (see :func:`chat_prompt`), else the prompt itself."""
    user_marker, answer_marker = chat_markers(processor)
    stripped = prompt.strip()
    if not stripped.endswith(answer_marker):
        return prompt
    words = stripped[: len(stripped) - len(answer_marker)]
    return words.rpartition(user_marker)[2] if user_marker in words else words


def chat_markers(processor) -> tuple[str, str]:
    """The chat template's user-turn and answer markers, as the last line the template writes
    before the user's text and after it: ("USER:", "ASSISTANT:") for LLaVA-1.5,
    ("<|im_start|>user", "<|im_start|>assistant") for ChatML."""
    if not getattr(processor, "chat_template", None):
        return "USER:", "ASSISTANT:"
    before, _, after = _render_chat(processor, [{"type": "text", "text": _TEXT_MARK}]).partition(_TEXT_MARK)
    user_lines, answer_lines = before.strip().splitlines(), after.strip().splitlines()
    bos = getattr(getattr(processor, "tokenizer", processor), "bos_token", None)
    user_marker = user_lines[-1].strip() if user_lines else ""
    if bos and user_marker.startswith(bos) and user_marker != bos:
        user_marker = user_marker[len(bos) :].lstrip()
    # A template that writes nothing around the text has no markers: no prompt matches U+E000 twice.
    return user_marker or _TEXT_MARK * 2, answer_lines[-1].strip() if answer_lines else _TEXT_MARK * 2


def _shown(text: str, width: int = 60) -> str:
    """``text`` for an error line: quoted, cut at ``width`` characters."""
    return repr(text if len(text) <= width else text[:width] + "...")


#: A private-use character no chat template writes: it marks where a template puts the user's text.
_TEXT_MARK = "\ue000"


def _render_chat(processor, content: list[dict]) -> str:
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def template_image_block(processor) -> str:
    """What the processor's chat template writes for one image (``"<image>\\n"`` for LLaVA-1.5,
    ``"<|vision_start|><|image_pad|><|vision_end|>"`` for Qwen2.5-VL): the difference between
    a user turn of text alone and the same turn with one image."""
    text_only = _render_chat(processor, [{"type": "text", "text": _TEXT_MARK}])
    with_image = _render_chat(processor, [{"type": "image"}, {"type": "text", "text": _TEXT_MARK}])
    prefix = len(os.path.commonprefix([text_only, with_image]))
    suffix = len(os.path.commonprefix([text_only[prefix:][::-1], with_image[prefix:][::-1]]))
    return with_image[prefix : len(with_image) - suffix]
