"""LLaVA-1.5: a CLIP tower, an MLP projector, one view per image."""

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


def llava_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    side = patch_grid_side(config.vision_config)
    image_tokens = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    input_ids = llava_prompt(config, batch, text_tokens, image_tokens, seed)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels)
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, f"one {size} px image")


def llava_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int) -> tuple[float, float]:
    """(vision, projector) FLOPs of LLaVA-1.5: one CLIP view per image, the MLP projector."""
    vision = batch * clip_tower_flops(config.vision_config, 1, vision_layers_run(config, pruned))
    return vision, batch * llava_projector_flops(config, projected)


RECORD = Family(
    ("llava",),
    llava_inputs,
    llava_vision_flops,
    compares_tower=True,
)
