"""Model adapters: one small class per model family, behind :class:`ModelAdapter`."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..pipeline import NEWLINES, TEXT_TOKENS, TILE_BUDGETS, VIDEO_BUDGETS, ImageSelection, TokenRegion, VisualItem
from .base import ModelAdapter, PrunedInputs
from .gemma3 import Gemma3Adapter
from .idefics3 import Idefics3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen3_vl import Qwen3VLAdapter
from .qwen_vl import QwenVLAdapter

#: Every adapter, in lookup order.
ADAPTERS: list[type[ModelAdapter]] = [
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    QwenVLAdapter,
    Qwen3VLAdapter,
    Gemma3Adapter,
    InternVLAdapter,
    Idefics3Adapter,
    LlavaNextVideoAdapter,
]


def family_name(adapter: type[ModelAdapter]) -> str:
    """A family's name: the module of its adapter, and of its vLLM class
    (``integrations/vllm/<name>.py``), its bench record (``bench/families/<name>.py``) and its
    test case (``tests/families/<name>.py``)."""
    return adapter.__module__.rsplit(".", 1)[1]


def supported_architectures() -> list[str]:
    """Hugging Face class names that flashvlm can prune."""
    return [name for adapter in ADAPTERS for name in adapter.architectures]


def adapter_for(
    model: nn.Module,
    video_budget: str = "per_frame",
    tokenizer=None,
    newlines: str = "kept_rows",
    tile_budget: str = "per_image",
) -> ModelAdapter:
    """The adapter serving ``model``, or :class:`UnsupportedModelError` naming the supported ones."""
    for adapter in ADAPTERS:
        if adapter.serves(model):
            return adapter(
                model, video_budget=video_budget, tokenizer=tokenizer, newlines=newlines, tile_budget=tile_budget
            )
    kind = type(model).__name__
    has_vision = any(
        hasattr(getattr(model, "model", model), name) for name in ("vision_tower", "visual", "vision_model")
    )
    reason = "is not a vision-language model (it has no vision tower)" if not has_vision else "is not supported yet"
    raise UnsupportedModelError(f"{kind} {reason}; flashvlm supports: {', '.join(supported_architectures())}")


__all__ = [
    "ADAPTERS",
    "TEXT_TOKENS",
    "VIDEO_BUDGETS",
    "ImageSelection",
    "ModelAdapter",
    "NEWLINES",
    "TILE_BUDGETS",
    "PrunedInputs",
    "TokenRegion",
    "VisualItem",
    "adapter_for",
    "family_name",
    "supported_architectures",
]
