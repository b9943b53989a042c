"""LLaVA-OneVision: a SigLIP tower on an AnyRes image (base view + crops), an MLP projector."""

from __future__ import annotations

import torch

from ..flops import patch_grid_side, siglip_tower_flops
from .shared import (
    Family,
    SyntheticInputs,
    clip_shrink_layers,
    clip_shrink_width,
    llava_projector_flops,
    llava_prompt,
)

#: Crops a side of the synthetic image: a 768 px square at 384 px tiles is cut 2 x 2, a
#: raster of 54 x 54 tokens, below ``anyres_max_9``'s limit, so no crop is downsampled.
ONEVISION_GRID = 2


def llava_onevision_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """A square image of g x g tiles: the base view, then the crops' raster with a newline per row."""
    size = config.vision_config.image_size
    resolution = ONEVISION_GRID * size
    side = patch_grid_side(config.vision_config)
    rows = ONEVISION_GRID * side
    image_tokens = side * side + rows * rows + rows
    input_ids = llava_prompt(config, batch, text_tokens, image_tokens, seed)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 1 + ONEVISION_GRID**2, 3, size, size, generator=generator)  # (B, views, 3, H, W)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixels,
        image_sizes=torch.tensor([[resolution, resolution]] * batch),
    )
    layout = f"one {resolution} px image: base view + {ONEVISION_GRID} x {ONEVISION_GRID} crops"
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, layout)


def llava_onevision_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) FLOPs of LLaVA-OneVision: SigLIP on the base view and the g x g
    crops (every layer: the features come from the last), LLaVA's projector."""
    side = patch_grid_side(config.vision_config)
    grid = round(((visual_tokens - side * side) / side**2) ** 0.5)
    vision = batch * siglip_tower_flops(config.vision_config, 1 + grid * grid)
    return vision, batch * llava_projector_flops(config, projected)


RECORD = Family(
    ("llava_onevision",),
    llava_onevision_inputs,
    llava_onevision_vision_flops,
    shrink_vision_layers=clip_shrink_layers,
    shrink_vision_width=clip_shrink_width,
)
