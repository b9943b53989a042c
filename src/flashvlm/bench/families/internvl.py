"""InternVL3/3.5 in the HF format: InternViT on dynamic tiles, a pixel shuffle, an MLP projector."""

from __future__ import annotations

import torch

from ..flops import clip_tower_flops, patch_grid_side, square_size
from .shared import Family, SyntheticInputs, prompt_rows, vision_layers_run

#: Tiles a side of InternVL's synthetic image: a square image of 900 px or so is cut 2 x 2, plus the thumbnail.
INTERNVL_TILE_GRID = 2


def internvl_tokens_per_tile(config) -> int:
    """Language-model tokens of one InternVL tile: its patch raster after the pixel shuffle."""
    return round(patch_grid_side(config.vision_config) * config.downsample_ratio) ** 2


def internvl_feature_width(config) -> int:
    """Width of InternVL's pixel-shuffled features: each group's patch features side by side."""
    return config.vision_config.hidden_size * round(1 / config.downsample_ratio) ** 2


def internvl_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """``<img>``, the context tokens of g x g tiles and the thumbnail, ``</img>``, as InternVLProcessor
    writes them. The config does not hold the ids of ``<img>``/``</img>``: they are taken as the two
    ids below the context token, where InternVL3/3.5's tokenizers put them."""
    generator = torch.Generator().manual_seed(seed)
    tiles = INTERNVL_TILE_GRID**2 + 1
    image_tokens = tiles * internvl_tokens_per_tile(config)
    start, end = config.image_token_id - 2, config.image_token_id - 1
    image = [start] + [config.image_token_id] * image_tokens + [end]
    avoid = {start, end, config.image_token_id}
    input_ids = prompt_rows(generator, batch, text_tokens - 2, config.text_config.vocab_size, avoid, image)
    size = square_size(config.vision_config.image_size)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(batch * tiles, 3, size, size, generator=generator),  # every row's tiles, in order
    )
    layout = f"one image: {INTERNVL_TILE_GRID} x {INTERNVL_TILE_GRID} tiles of {size} px + thumbnail"
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, layout)


def internvl_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) of InternVL: InternViT (CLS included) on every tile of the image,
    the MLP projector (LayerNorm, vision x 4 -> LM hidden -> LM hidden) on the pixel-shuffled rows."""
    tiles = visual_tokens // internvl_tokens_per_tile(config)
    vision = batch * clip_tower_flops(config.vision_config, tiles, vision_layers_run(config, pruned))
    shuffled, hidden = internvl_feature_width(config), config.text_config.hidden_size
    return vision, float(batch * 2 * projected * (shuffled * hidden + hidden * hidden))


RECORD = Family(
    ("internvl",),
    internvl_inputs,
    internvl_vision_flops,
    feature_width=internvl_feature_width,
)
