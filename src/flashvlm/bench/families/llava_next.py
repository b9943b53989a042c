"""LLaVA-NeXT: a CLIP tower on an AnyRes image (base view + crops), an MLP projector."""

from __future__ import annotations

from ..flops import clip_tower_flops
from .shared import (
    Family,
    SyntheticInputs,
    anyres_square_inputs,
    anyres_views,
    llava_projector_flops,
    vision_layers_run,
)


def llava_next_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """A square image at the largest square AnyRes resolution: base view + g x g crops."""
    size = config.vision_config.image_size
    squares = [h for h, w in config.image_grid_pinpoints if h == w]
    resolution = max(squares) if squares else size
    return anyres_square_inputs(config, batch, text_tokens, seed, grid=resolution // size)


def llava_next_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) FLOPs of LLaVA-NeXT: the base view and g x g crops per image."""
    views = anyres_views(config, visual_tokens)
    vision = batch * clip_tower_flops(config.vision_config, views, vision_layers_run(config, pruned))
    return vision, batch * llava_projector_flops(config, projected)


RECORD = Family(("llava_next",), llava_next_inputs, llava_next_vision_flops)
