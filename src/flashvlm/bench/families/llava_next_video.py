"""LLaVA-NeXT-Video: CLIP on every frame, 2 x 2 pooling, an MLP projector."""

from __future__ import annotations

import torch

from ..flops import clip_tower_flops, patch_grid_side
from .shared import (
    Family,
    SyntheticInputs,
    llava_projector_flops,
    llava_prompt,
    vision_layers_run,
)

#: Frames of the synthetic video (the number the model card's examples sample).
VIDEO_FRAMES = 8


def llava_next_video_tokens_per_frame(config) -> int:
    """Language-model tokens of one LLaVA-NeXT-Video frame: its patch raster after the resampler's pooling."""
    return (patch_grid_side(config.vision_config) // config.spatial_pool_stride) ** 2


def llava_next_video_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """BOS, 5 text tokens, a video of 8 frames, the rest of the text: the budget counts per frame
    (``video_budget="per_frame"``, the default), so K per frame, 8 K per row."""
    video_tokens = VIDEO_FRAMES * llava_next_video_tokens_per_frame(config)
    input_ids = llava_prompt(config, batch, text_tokens, video_tokens, seed, placeholder=config.video_token_id)
    size = config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values_videos=torch.randn(batch, VIDEO_FRAMES, 3, size, size, generator=generator),  # (B, F, 3, H, W)
    )
    layout = f"one video of {VIDEO_FRAMES} frames of {size} px, budget per frame"
    return SyntheticInputs(kwargs, video_tokens, text_tokens, batch, config.video_token_id, layout)


def llava_next_video_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) of LLaVA-NeXT-Video on a video: the CLIP tower on every frame (the
    resampler's pooling has no matmuls), LLaVA's projector on the pooled rows."""
    frames = visual_tokens // llava_next_video_tokens_per_frame(config)
    vision = batch * clip_tower_flops(config.vision_config, frames, vision_layers_run(config, pruned))
    return vision, batch * llava_projector_flops(config, projected)


RECORD = Family(
    ("llava_next_video",),
    llava_next_video_inputs,
    llava_next_video_vision_flops,
)
