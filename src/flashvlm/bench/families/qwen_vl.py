"""Qwen2.5-VL: a windowed ViT with a 2 x 2 patch merger, an M-RoPE language model."""

from __future__ import annotations

import torch

from ..flops import encoder_layer_flops
from .shared import Family, SyntheticInputs, prompt_rows, shrink_width

#: Image side in pixels for Qwen2.5-VL inputs: 672 px -> 48 x 48 patches -> 576 LM tokens.
QWEN_IMAGE_SIDE = 672


def qwen2_5_vl_inputs(
    config, batch: int, text_tokens: int, seed: int = 0, image_side: int = QWEN_IMAGE_SIDE
) -> SyntheticInputs:
    vision = config.vision_config
    patches_side = image_side // vision.patch_size
    merge = vision.spatial_merge_size
    image_tokens = (patches_side // merge) ** 2
    generator = torch.Generator().manual_seed(seed)
    avoid = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
    image = [config.vision_start_token_id] + [config.image_token_id] * image_tokens + [config.vision_end_token_id]
    input_ids = prompt_rows(generator, batch, text_tokens - 2, config.text_config.vocab_size, avoid, image)
    patch_width = 3 * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(batch * patches_side**2, patch_width, generator=generator)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixels,
        image_grid_thw=torch.tensor([[1, patches_side, patches_side]] * batch),
    )
    layout = f"one {image_side} px image"
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, layout)


def qwen_tower_flops(vision_config, patches: int) -> float:
    """Qwen2.5-VL's ViT on one image of ``patches`` patches: windowed blocks and full blocks.

    The patch merger (2x2 groups -> LM width) is counted here: it is the projector.
    """
    width, inner = vision_config.hidden_size, vision_config.intermediate_size
    window_tokens = min(patches, (vision_config.window_size // vision_config.patch_size) ** 2)
    embed = 2 * patches * 3 * vision_config.temporal_patch_size * vision_config.patch_size**2 * width
    full_blocks = sum(1 for index in vision_config.fullatt_block_indexes if index < vision_config.depth)
    window_blocks = vision_config.depth - full_blocks
    blocks = full_blocks * encoder_layer_flops(patches, width, inner, True, patches)
    blocks += window_blocks * encoder_layer_flops(patches, width, inner, True, window_tokens)
    merged_width = width * vision_config.spatial_merge_size**2
    merged = patches // vision_config.spatial_merge_size**2
    merger = 2 * merged * (merged_width * merged_width + merged_width * vision_config.out_hidden_size)
    return float(embed + blocks + merger)


def qwen_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, 0): Qwen2.5-VL's tower with its merger (Qwen projects before any selection can run)."""
    patches = visual_tokens * config.vision_config.spatial_merge_size**2
    return batch * qwen_tower_flops(config.vision_config, patches), 0.0


def qwen_shrink_layers(vision, layers: int) -> None:
    vision.depth = min(layers, vision.depth)
    # Keep the last kept block a full-attention one, as every real checkpoint has it.
    full = [index for index in vision.fullatt_block_indexes if index < vision.depth]
    vision.fullatt_block_indexes = sorted(set(full) | {vision.depth - 1})


def qwen_shrink_width(vision, width: float) -> None:
    shrink_width(vision, width, ("hidden_size", "intermediate_size"), ("num_heads",))


def qwen_link_widths(config) -> None:
    config.vision_config.out_hidden_size = config.text_config.hidden_size


RECORD = Family(
    ("qwen2_5_vl",),
    qwen2_5_vl_inputs,
    qwen_vision_flops,
    vision_layer_count=lambda vision: vision.depth,
    shrink_vision_layers=qwen_shrink_layers,
    shrink_vision_width=qwen_shrink_width,
    link_widths=qwen_link_widths,
)
