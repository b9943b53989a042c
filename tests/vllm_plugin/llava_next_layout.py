"""Run inside a vLLM job (``"apply": "llava_next_layout:layout_matches_vllm_merge"``): the
plug-in's AnyRes layout against vLLM's own merge of an image's view tokens."""

from __future__ import annotations

import torch

from flashvlm.integrations.vllm.llava_next import views_per_image

#: (height, width): wide, tall, square, extreme and tiny images.
SIZES = [(30, 45), (45, 24), (48, 48), (17, 100), (100, 17), (24, 24), (333, 77), (5, 7)]


def layout_matches_vllm_merge(model) -> list[bool]:
    """For each size, whether ``anyres_sequence`` equals ``_merge_image_patch_embeddings``."""
    vision = model.config.vision_config
    view_tokens = (vision.image_size // vision.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    matches = []
    for height, width in SIZES:
        size = torch.tensor([height, width])
        (views,) = views_per_image(model.config, size[None])
        tokens = torch.randn(views, view_tokens, model.image_newline.shape[0], generator=generator)  # (1 + P, n, D)
        merged = model._merge_image_patch_embeddings(size, tokens.to(model.image_newline), strategy="spatial_unpad")
        sequence = model.anyres_sequence(model.anyres_layout(size), tokens.flatten(0, 1).to(model.image_newline))
        matches.append(merged.shape == sequence.shape and torch.equal(merged, sequence))
    return matches
