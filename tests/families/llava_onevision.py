"""LLaVA-OneVision: AnyRes images with crop rasters interpolated down, and videos pooled per frame."""

from __future__ import annotations

from . import TinyCase
from .shared import (
    ANYRES_PINPOINTS,
    ANYRES_TILE,
    IMAGE_TOKEN_ID,
    LLAVA_CHAT_TEMPLATE,
    NO_CLS,
    PAD_TOKEN_ID,
    PATCH_SIZE,
    VIDEO_TOKEN_ID,
    anyres_batch,
    anyres_row,
    anyres_video_batch,
    eval_model,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)


def build_tiny_llava_onevision(seed: int = 0):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = tiny_vision_config(SiglipVisionConfig, ANYRES_TILE)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=tiny_text_config(Qwen2Config),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        image_grid_pinpoints=ANYRES_PINPOINTS,
        # Shrinks crop rasters above ~1 view (the real models use anyres_max_9), so the
        # tiny model exercises the interpolation path.
        vision_aspect_ratio="anyres_max_1",
        pad_token_id=PAD_TOKEN_ID,
    )
    return eval_model(LlavaOnevisionForConditionalGeneration, config, seed)


def tiny_llava_onevision_processor(pinpoints=ANYRES_PINPOINTS, vision_aspect_ratio: str = "anyres_max_1"):
    """A LlavaOnevisionProcessor as the real checkpoints' (a PIL image processor), built without
    its video processor as it must be here, LLaVA-1.5's chat format."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    from flashvlm._torchvision_compat import without_video_processor

    tile = {"height": ANYRES_TILE, "width": ANYRES_TILE}
    image_processor = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=pinpoints, size=tile)
    return without_video_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        num_image_tokens=(ANYRES_TILE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        tokenizer=tiny_tokenizer(video_tokens=True),
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


CASES = [
    # Crop rasters are interpolated down to about one view: (30, 45) -> 36 base + 28 crop tokens.
    TinyCase("llava_onevision", build_tiny_llava_onevision, anyres_batch, 64, anyres_row, lacks=NO_CLS),
    # 6 x 6 raster pooled 2 x 2 -> 9 tokens per frame.
    TinyCase(
        "llava_onevision_video", build_tiny_llava_onevision, anyres_video_batch, 9, anyres_row, video=True, lacks=NO_CLS
    ),
]
