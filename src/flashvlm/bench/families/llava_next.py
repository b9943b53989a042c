"""LLaVA-NeXT: a CLIP tower on an AnyRes image (base view + crops), an MLP projector."""

from __future__ import annotations

import torch

from ..flops import clip_tower_flops, patch_grid_side
from .shared import (
    Family,
    SyntheticInputs,
    clip_shrink_layers,
    clip_shrink_width,
    llava_projector_flops,
    llava_prompt,
    vision_layers_run,
)


def llava_next_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """A square image at the largest square AnyRes resolution: base view + g x g crops."""
    size = config.vision_config.image_size
    squares = [h for h, w in config.image_grid_pinpoints if h == w]
    resolution = max(squares) if squares else size
    grid = resolution // size
    side = patch_grid_side(config.vision_config)
    image_tokens = side * side + (grid * side) ** 2 + grid * side  # base + crops + one newline per row
    input_ids = llava_prompt(config, batch, text_tokens, image_tokens, seed)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 1 + grid * grid, 3, size, size, generator=generator)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixels,
        image_sizes=torch.tensor([[resolution, resolution]] * batch),
    )
    layout = f"one {resolution} px image: base view + {grid} x {grid} crops"
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, layout)


def llava_next_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) FLOPs of LLaVA-NeXT: the base view and g x g crops per image."""
    side = patch_grid_side(config.vision_config)
    grid = round(((visual_tokens - side * side) / side**2) ** 0.5)
    views = 1 + grid * grid
    vision = batch * clip_tower_flops(config.vision_config, views, vision_layers_run(config, pruned))
    return vision, batch * llava_projector_flops(config, projected)


RECORD = Family(
    ("llava_next",),
    llava_next_inputs,
    llava_next_vision_flops,
    shrink_vision_layers=clip_shrink_layers,
    shrink_vision_width=clip_shrink_width,
)
