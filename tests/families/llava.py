"""LLaVA-1.5: a CLIP tower with a CLS token, a fixed 8 x 8 raster of visual tokens per image."""

from __future__ import annotations

from functools import partial

import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from . import TinyCase
from .shared import (
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    LLAVA_CHAT_TEMPLATE,
    PAD_TOKEN_ID,
    PATCH_SIZE,
    left_pad,
    pixel_row,
    random_pixels,
    tiny_clip_config,
    tiny_text_config,
    tiny_tokenizer,
)

NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64 visual tokens per image


def tiny_llava_config(**overrides) -> LlavaConfig:
    vision = tiny_clip_config()
    text = tiny_text_config(LlamaConfig)
    settings = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_TOKEN_ID,
    )
    settings.update(overrides)
    return LlavaConfig(**settings)


def build_tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**overrides))
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def llava_prompt(text_ids: list[int], images: int = 1, image_at: int = 1) -> list[int]:
    """BOS, then text with ``images`` blocks of placeholders inserted after ``image_at`` text tokens."""
    ids = [1] + text_ids[:image_at]
    for _ in range(images):
        ids += [IMAGE_TOKEN_ID] * NUM_PATCHES
    return ids + text_ids[image_at:]


def llava_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    """A left-padded batch of different prompts, one image per row (the last row has two)."""
    generator = torch.Generator().manual_seed(seed)
    rows, images = [], 0
    for row in range(batch_size):
        text = torch.randint(3, IMAGE_TOKEN_ID, (4 + 3 * row,), generator=generator).tolist()
        count = 2 if row == batch_size - 1 and batch_size > 1 else 1
        rows.append(llava_prompt(text, images=count, image_at=1 + row))
        images += count
    input_ids, attention_mask = left_pad(rows)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(images, seed))


def tiny_llava_processor():
    """A LlavaProcessor over the word-level tokenizer of the shared vocabulary."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


CASES = [
    TinyCase("llava", build_tiny_llava, llava_batch, NUM_PATCHES, partial(pixel_row, tokens_per_image=NUM_PATCHES))
]
