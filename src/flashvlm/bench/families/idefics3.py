"""Idefics3 / SmolVLM: SigLIP on split sub-images, a pixel shuffle, row/column markers."""

from __future__ import annotations

import torch

from ..flops import patch_grid_side, siglip_tower_flops
from .shared import Family, SyntheticInputs, prompt_rows

#: Sub-images a side of the synthetic image: the processors resize an image's longest edge to
#: 4 sub-image sides (1,536 px for SmolVLM2, 1,456 px for Idefics3), so a square image splits 4 x 4.
IDEFICS3_SPLIT = 4


def idefics3_feature_width(config) -> int:
    """Width of Idefics3/SmolVLM's pixel-shuffled features: each group's patch features side by side."""
    return config.vision_config.hidden_size * config.scale_factor**2


def idefics3_tokens_per_sub_image(config) -> int:
    """Language-model tokens of one Idefics3/SmolVLM sub-image: its patch raster after the pixel shuffle."""
    return (patch_grid_side(config.vision_config) // config.scale_factor) ** 2


def idefics3_image_block(config, split: int, per_sub_image: int) -> list[int]:
    """One split image as Idefics3Processor / SmolVLMProcessor write it: per sub-image
    ``<fake_token_around_image><row_i_col_j>`` and its tokens, a newline after each row, then a
    newline, ``<fake_token_around_image><global-img>``, the global view's tokens, ``<fake_token_around_image>``.
    The config does not hold the markers' ids: ``<fake_token_around_image>`` is the id below the
    image token (as in SmolVLM2's tokenizer), the others the ids below it."""
    image = [config.image_token_id] * per_sub_image
    fake, global_image, newline = config.image_token_id - 1, config.image_token_id - 2, config.image_token_id - 3
    block = []
    for row in range(split):
        for col in range(split):
            row_col = config.image_token_id - 4 - (row * split + col)
            block += [fake, row_col, *image]
        block.append(newline)
    return block + [newline, fake, global_image, *image, fake]


def idefics3_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """BOS, 5 text tokens, a 4 x 4 split image and its global view, the rest of the text. The
    row/column markers (40 at a 4 x 4 split) come on top of ``text_tokens``: they are text the
    language model prefills, so the inputs' ``text_tokens`` counts them."""
    generator = torch.Generator().manual_seed(seed)
    per_sub_image = idefics3_tokens_per_sub_image(config)
    block = idefics3_image_block(config, IDEFICS3_SPLIT, per_sub_image)
    vocab = config.text_config.vocab_size
    input_ids = prompt_rows(generator, batch, text_tokens - 1, vocab, set(block), block, (1,))
    sub_images = IDEFICS3_SPLIT**2 + 1
    size = config.vision_config.image_size
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(batch, sub_images, 3, size, size, generator=generator),  # (B, S, 3, H, W)
        pixel_attention_mask=torch.ones(batch, sub_images, size, size, dtype=torch.bool),
    )
    layout = f"one image split {IDEFICS3_SPLIT} x {IDEFICS3_SPLIT} into {size} px sub-images + global view"
    visual = sub_images * per_sub_image
    markers = len(block) - visual
    return SyntheticInputs(kwargs, visual, text_tokens + markers, batch, config.image_token_id, layout)


def idefics3_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) of Idefics3/SmolVLM: SigLIP on every sub-image, the connector's one
    linear map on the pixel-shuffled rows. The model's image path projects every row before
    any selection, so the projector counts all ``visual_tokens`` whatever ``projected`` says."""
    views = visual_tokens // idefics3_tokens_per_sub_image(config)
    projector = 2 * visual_tokens * idefics3_feature_width(config) * config.text_config.hidden_size
    return batch * siglip_tower_flops(config.vision_config, views), float(batch * projector)


RECORD = Family(
    ("idefics3", "smolvlm"),
    idefics3_inputs,
    idefics3_vision_flops,
    feature_width=idefics3_feature_width,
)
