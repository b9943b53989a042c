"""LLaVA-NeXT: AnyRes images (a base view and crops, newline tokens after each crop row)."""

from __future__ import annotations

from transformers import LlamaConfig

from . import TinyCase
from .shared import (
    ANYRES_PINPOINTS,
    ANYRES_TILE,
    IMAGE_TOKEN_ID,
    LLAVA_CHAT_TEMPLATE,
    PAD_TOKEN_ID,
    PATCH_SIZE,
    anyres_batch,
    anyres_row,
    eval_model,
    tiny_clip_config,
    tiny_text_config,
    tiny_tokenizer,
)


def build_tiny_llava_next(seed: int = 0):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = tiny_clip_config(ANYRES_TILE)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=tiny_text_config(LlamaConfig),
        image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=ANYRES_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_TOKEN_ID,
    )
    return eval_model(LlavaNextForConditionalGeneration, config, seed)


def tiny_llava_next_processor():
    """A LlavaNextProcessor as the real checkpoints' (a PIL image processor), LLaVA-1.5's chat format."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    tile = {"height": ANYRES_TILE, "width": ANYRES_TILE}
    image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=ANYRES_PINPOINTS, size={"shortest_edge": ANYRES_TILE}, crop_size=tile
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        tokenizer=tiny_tokenizer(video_tokens=True),
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


CASES = [
    # Smallest image: (45, 24) -> 36 base + 72 unpadded crop tokens (newlines not counted).
    TinyCase("llava_next", build_tiny_llava_next, anyres_batch, 108, anyres_row),
]
