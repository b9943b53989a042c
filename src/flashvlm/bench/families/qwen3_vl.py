"""Qwen3-VL: a full-attention ViT, a 2 x 2 merger, DeepStack, an M-RoPE language model."""

from __future__ import annotations

from ..flops import encoder_layer_flops
from .qwen_vl import qwen2_5_vl_inputs, qwen_link_widths, qwen_shrink_width
from .shared import Family, SyntheticInputs

#: Image side in pixels for Qwen3-VL inputs: 768 px -> 48 x 48 patches of 16 -> 576 LM tokens.
QWEN3_IMAGE_SIDE = 768


def qwen3_vl_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """As Qwen2.5-VL's, at 16-px patches, with the ``mm_token_type_ids`` Qwen3-VL requires."""
    inputs = qwen2_5_vl_inputs(config, batch, text_tokens, seed, image_side=QWEN3_IMAGE_SIDE)
    input_ids = inputs.model_kwargs["input_ids"]
    inputs.model_kwargs["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    return inputs


def qwen3_tower_flops(vision_config, patches: int) -> float:
    """Qwen3-VL's ViT on one image of ``patches`` patches: every block attends fully within
    the image (plain two-matrix MLPs); the merger and the DeepStack mergers (2x2 groups ->
    LM width) are counted here, as they run before any selection."""
    width, inner = vision_config.hidden_size, vision_config.intermediate_size
    embed = 2 * patches * 3 * vision_config.temporal_patch_size * vision_config.patch_size**2 * width
    blocks = vision_config.depth * encoder_layer_flops(patches, width, inner, False, patches)
    merged_width = width * vision_config.spatial_merge_size**2
    merged = patches // vision_config.spatial_merge_size**2
    mergers = 1 + len(vision_config.deepstack_visual_indexes)
    merger = mergers * 2 * merged * (merged_width * merged_width + merged_width * vision_config.out_hidden_size)
    return float(embed + blocks + merger)


def qwen3_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, 0): Qwen3-VL's tower with its mergers."""
    patches = visual_tokens * config.vision_config.spatial_merge_size**2
    return batch * qwen3_tower_flops(config.vision_config, patches), 0.0


def qwen3_shrink_layers(vision, layers: int) -> None:
    # DeepStack taps keep their relative depths in the shortened tower.
    depth = vision.depth
    vision.depth = min(layers, depth)
    taps = sorted({min(vision.depth - 1, index * vision.depth // depth) for index in vision.deepstack_visual_indexes})
    vision.deepstack_visual_indexes = taps


RECORD = Family(
    ("qwen3_vl",),
    qwen3_vl_inputs,
    qwen3_vision_flops,
    vision_layer_count=lambda vision: vision.depth,
    shrink_vision_layers=qwen3_shrink_layers,
    shrink_vision_width=qwen_shrink_width,
    link_widths=qwen_link_widths,
)
