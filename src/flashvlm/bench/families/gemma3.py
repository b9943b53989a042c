"""Gemma 3: a SigLIP tower pooled to 256 tokens, bidirectional attention over an image."""

from __future__ import annotations

import torch

from ..flops import siglip_tower_flops
from .shared import Family, SyntheticInputs, prompt_rows


def gemma3_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """BOS, 5 text tokens, begin-image, the image's tokens, end-image, the rest of the text."""
    generator = torch.Generator().manual_seed(seed)
    image_tokens = config.mm_tokens_per_image
    avoid = {config.image_token_id, config.boi_token_index, config.eoi_token_index}
    image = [config.boi_token_index] + [config.image_token_id] * image_tokens + [config.eoi_token_index]
    input_ids = prompt_rows(generator, batch, text_tokens - 3, config.text_config.vocab_size, avoid, image, (2,))
    size = config.vision_config.image_size
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        token_type_ids=(input_ids == config.image_token_id).long(),
        pixel_values=torch.randn(batch, 3, size, size, generator=generator),
    )
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, f"one {size} px image")


def gemma3_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) of Gemma 3: the whole SigLIP tower, then the projection of the pooled tokens."""
    projector = 2 * projected * config.vision_config.hidden_size * config.text_config.hidden_size
    return batch * siglip_tower_flops(config.vision_config, 1), float(batch * projector)


RECORD = Family(
    ("gemma3",),
    gemma3_inputs,
    gemma3_vision_flops,
)
