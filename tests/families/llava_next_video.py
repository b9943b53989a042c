"""LLaVA-NeXT-Video: AnyRes images as LLaVA-NeXT, videos pooled 2 x 2 per frame."""

from __future__ import annotations

from transformers import LlamaConfig

from . import TinyCase
from .shared import (
    ANYRES_PINPOINTS,
    ANYRES_TILE,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VIDEO_TOKEN_ID,
    anyres_row,
    anyres_video_batch,
    eval_model,
    tiny_clip_config,
    tiny_text_config,
)


def build_tiny_llava_next_video(seed: int = 0):
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    config = LlavaNextVideoConfig(
        vision_config=tiny_clip_config(ANYRES_TILE),
        text_config=tiny_text_config(LlamaConfig),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        image_grid_pinpoints=ANYRES_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        pad_token_id=PAD_TOKEN_ID,
    )
    return eval_model(LlavaNextVideoForConditionalGeneration, config, seed)


CASES = [
    # One AnyRes image and one video per row: 6 x 6 pooled 2 x 2 -> 9 tokens per frame.
    TinyCase("llava_next_video", build_tiny_llava_next_video, anyres_video_batch, 9, anyres_row, video=True),
]
