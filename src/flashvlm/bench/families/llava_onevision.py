"""LLaVA-OneVision: a SigLIP tower on an AnyRes image (base view + crops), an MLP projector."""

from __future__ import annotations

from ..flops import siglip_tower_flops
from .shared import Family, SyntheticInputs, anyres_square_inputs, anyres_views, llava_projector_flops

#: Crops a side of the synthetic image: a 768 px square at 384 px tiles is cut 2 x 2, a
#: raster of 54 x 54 tokens, below ``anyres_max_9``'s limit, so no crop is downsampled.
ONEVISION_GRID = 2


def llava_onevision_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    return anyres_square_inputs(config, batch, text_tokens, seed, grid=ONEVISION_GRID)


def llava_onevision_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) FLOPs of LLaVA-OneVision: SigLIP on the base view and the g x g
    crops (every layer: the features come from the last), LLaVA's projector."""
    vision = batch * siglip_tower_flops(config.vision_config, anyres_views(config, visual_tokens))
    return vision, batch * llava_projector_flops(config, projected)


RECORD = Family(("llava_onevision",), llava_onevision_inputs, llava_onevision_vision_flops)
