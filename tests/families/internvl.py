"""InternVL (HF-native InternVL3/3.5): an image as dynamic tiles plus a thumbnail, each tile's
InternViT raster pixel-shuffled into 16 tokens, between <img> and </img>."""

from __future__ import annotations

from functools import partial

import torch
from transformers import Qwen2Config

from . import TinyCase
from .shared import (
    CHATML_TEMPLATE,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    TILE_SIZE,
    TILED_SPECIAL_TOKENS,
    TILED_VOCAB_SIZE,
    TOKENS_PER_TILE,
    VIDEO_TOKEN_ID,
    eval_model,
    fixed_id_tokenizer,
    image_processor_class,
    left_pad,
    pixel_row,
    tiny_text_config,
    tiny_vision_config,
)

INTERNVL_START_ID, INTERNVL_END_ID = TILED_SPECIAL_TOKENS["<img>"], TILED_SPECIAL_TOKENS["</img>"]
#: Tiles per image, one list per row, cycling: 2 tiles + thumbnail; one tile; two images in a row.
INTERNVL_TILES = [[3], [1], [1, 3]]


def build_tiny_internvl(seed: int = 0, **vision_overrides):
    """``vision_overrides``: InternViT settings, e.g. ``use_qk_norm=True`` as InternViT-6B has."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    vision = tiny_vision_config(InternVLVisionConfig, TILE_SIZE, **vision_overrides)
    config = InternVLConfig(
        vision_config=vision,
        text_config=tiny_text_config(Qwen2Config, vocab_size=TILED_VOCAB_SIZE),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=TOKENS_PER_TILE,
        pad_token_id=PAD_TOKEN_ID,
    )
    return eval_model(InternVLForConditionalGeneration, config, seed)


def internvl_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    """Rows of text with ``<img> context*16*tiles </img>`` blocks, as InternVLProcessor writes
    them; pixel_values hold every image's tiles (thumbnail last) in placeholder order."""
    generator = torch.Generator().manual_seed(seed)
    rows, tiles = [], []
    for row in range(batch_size):
        text = torch.randint(3, VIDEO_TOKEN_ID, (4 + 2 * row,), generator=generator).tolist()
        ids = [1] + text[:2]
        for count in INTERNVL_TILES[row % len(INTERNVL_TILES)]:
            ids += [INTERNVL_START_ID] + [IMAGE_TOKEN_ID] * (TOKENS_PER_TILE * count) + [INTERNVL_END_ID]
            tiles.append(count)
        rows.append(ids + text[2:])
    input_ids, attention_mask = left_pad(rows)
    pixel_values = torch.randn(sum(tiles), 3, TILE_SIZE, TILE_SIZE, generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


def tiny_internvl_processor():
    """InternVLProcessor: 32 px tiles, up to 4 of them plus the thumbnail for a large image."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    tokenizer = fixed_id_tokenizer(
        start_image_token="<img>", end_image_token="</img>", context_image_token="<image>", video_token="<video>"
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE_SIZE, "width": TILE_SIZE}, crop_to_patches=True, max_patches=4
    )
    return image_processor_class(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=TOKENS_PER_TILE,
        chat_template=CHATML_TEMPLATE.replace("{{ image_placeholder }}", "<image>\n"),
    )


CASES = [
    # Smallest unit: a one-tile image, 4 x 4 tokens after the pixel shuffle; each tile of a
    # split image is such a raster for grid-based methods. A row's tiles are the ones its
    # placeholders count.
    TinyCase(
        "internvl",
        build_tiny_internvl,
        internvl_batch,
        TOKENS_PER_TILE,
        partial(pixel_row, tokens_per_image=TOKENS_PER_TILE),
    ),
]
