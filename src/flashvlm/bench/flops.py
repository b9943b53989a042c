"""Analytic FLOPs of a VLM's prefill, and KV-cache bytes, from the config alone.

One multiply-add counts as 2 FLOPs. Counted: every matrix multiplication (projections,
attention scores and values, MLPs, the patch embedding, the projector, the LM head
for the last position, as ``generate`` computes it). Not counted: norms, softmax,
activations, rotary embeddings (all O(T * D), negligible next to the matmuls).
Causal attention counts T(T+1)/2 query-key pairs, as FlashAttention/SDPA compute it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection.diversity import DIRECT_ROUND_PLACES, removal_count, uses_similarity_matrix


def _head_size(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def decoder_prefill_flops(text_config, num_tokens: int, batch: int = 1, logits_positions: int = 1) -> float:
    """FLOPs of one prefill of ``num_tokens`` positions per row through the language model.

    Llama/Mistral/Qwen2 decoders: q/k/v/o projections (grouped KV), causal attention,
    a gated MLP (three matrices), and the LM head on ``logits_positions`` positions.
    """
    hidden, inner = text_config.hidden_size, text_config.intermediate_size
    head = _head_size(text_config)
    query_width = text_config.num_attention_heads * head
    kv_width = text_config.num_key_value_heads * head
    tokens = num_tokens
    projections = 2 * tokens * hidden * (2 * query_width + 2 * kv_width)
    attention = 4 * (tokens * (tokens + 1) // 2) * query_width
    mlp = 2 * tokens * 3 * hidden * inner
    per_layer = projections + attention + mlp
    lm_head = 2 * logits_positions * hidden * text_config.vocab_size
    return float(batch * (text_config.num_hidden_layers * per_layer + lm_head))


def kv_cache_bytes(text_config, num_tokens: int, batch: int, dtype: torch.dtype) -> int:
    """Bytes of the keys and values of ``num_tokens`` positions in every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * text_config.num_key_value_heads * _head_size(text_config) * element
    return batch * text_config.num_hidden_layers * num_tokens * per_token


def _encoder_layer_flops(tokens: int, width: int, inner: int, gated: bool, attended: int) -> float:
    """One ViT block: q/k/v/o, attention of each token to ``attended`` tokens, the MLP."""
    projections = 2 * tokens * 4 * width * width
    attention = 4 * tokens * attended * width
    mlp = 2 * tokens * (3 if gated else 2) * width * inner
    return float(projections + attention + mlp)


def square_size(size) -> int:
    """A square size given as an int or an (h, w) pair (InternViT's config writes pairs)."""
    return size[0] if isinstance(size, (list, tuple)) else size


def patch_grid_side(vision_config) -> int:
    """Patches along a side of the tower's square input."""
    return square_size(vision_config.image_size) // square_size(vision_config.patch_size)


def internvl_tokens_per_tile(config) -> int:
    """Language-model tokens of one InternVL tile: its patch raster after the pixel shuffle."""
    return round(patch_grid_side(config.vision_config) * config.downsample_ratio) ** 2


def internvl_feature_width(config) -> int:
    """Width of InternVL's pixel-shuffled features: each group's patch features side by side."""
    return config.vision_config.hidden_size * round(1 / config.downsample_ratio) ** 2


def idefics3_feature_width(config) -> int:
    """Width of Idefics3/SmolVLM's pixel-shuffled features: each group's patch features side by side."""
    return config.vision_config.hidden_size * config.scale_factor**2


def idefics3_tokens_per_sub_image(config) -> int:
    """Language-model tokens of one Idefics3/SmolVLM sub-image: its patch raster after the pixel shuffle."""
    return (patch_grid_side(config.vision_config) // config.scale_factor) ** 2


def llava_next_video_tokens_per_frame(config) -> int:
    """Language-model tokens of one LLaVA-NeXT-Video frame: its patch raster after the resampler's pooling."""
    return (patch_grid_side(config.vision_config) // config.spatial_pool_stride) ** 2


def clip_tower_flops(vision_config, num_views: int, layers_run: int) -> float:
    """A tower with a CLS token (CLIP, InternViT) on ``num_views`` images of image_size px,
    running ``layers_run`` layers."""
    patches = patch_grid_side(vision_config) ** 2
    tokens = patches + 1  # CLS
    width = vision_config.hidden_size
    embed = 2 * patches * 3 * square_size(vision_config.patch_size) ** 2 * width
    layer = _encoder_layer_flops(tokens, width, vision_config.intermediate_size, False, tokens)
    return float(num_views * (embed + layers_run * layer))


def llava_projector_flops(config, num_tokens: int) -> float:
    """LLaVA's two-layer MLP projector (vision hidden -> LM hidden -> LM hidden) on ``num_tokens`` rows."""
    vision, hidden = config.vision_config.hidden_size, config.text_config.hidden_size
    return float(2 * num_tokens * (vision * hidden + hidden * hidden))


def qwen_tower_flops(vision_config, patches: int) -> float:
    """Qwen2.5-VL's ViT on one image of ``patches`` patches: windowed blocks and full blocks.

    The patch merger (2x2 groups -> LM width) is counted here: it is the projector.
    """
    width, inner = vision_config.hidden_size, vision_config.intermediate_size
    window_tokens = min(patches, (vision_config.window_size // vision_config.patch_size) ** 2)
    embed = 2 * patches * 3 * vision_config.temporal_patch_size * vision_config.patch_size**2 * width
    full_blocks = sum(1 for index in vision_config.fullatt_block_indexes if index < vision_config.depth)
    window_blocks = vision_config.depth - full_blocks
    blocks = full_blocks * _encoder_layer_flops(patches, width, inner, True, patches)
    blocks += window_blocks * _encoder_layer_flops(patches, width, inner, True, window_tokens)
    merged_width = width * vision_config.spatial_merge_size**2
    merged = patches // vision_config.spatial_merge_size**2
    merger = 2 * merged * (merged_width * merged_width + merged_width * vision_config.out_hidden_size)
    return float(embed + blocks + merger)


def qwen3_tower_flops(vision_config, patches: int) -> float:
    """Qwen3-VL's ViT on one image of ``patches`` patches: every block attends fully within
    the image (plain two-matrix MLPs); the merger and the DeepStack mergers (2x2 groups ->
    LM width) are counted here, as they run before any selection."""
    width, inner = vision_config.hidden_size, vision_config.intermediate_size
    embed = 2 * patches * 3 * vision_config.temporal_patch_size * vision_config.patch_size**2 * width
    blocks = vision_config.depth * _encoder_layer_flops(patches, width, inner, False, patches)
    merged_width = width * vision_config.spatial_merge_size**2
    merged = patches // vision_config.spatial_merge_size**2
    mergers = 1 + len(vision_config.deepstack_visual_indexes)
    merger = mergers * 2 * merged * (merged_width * merged_width + merged_width * vision_config.out_hidden_size)
    return float(embed + blocks + merger)


def siglip_tower_flops(vision_config, num_views: int) -> float:
    """A SigLIP tower (no CLS token) on ``num_views`` images, every layer run."""
    patches = patch_grid_side(vision_config) ** 2
    width = vision_config.hidden_size
    embed = 2 * patches * 3 * square_size(vision_config.patch_size) ** 2 * width
    layer = _encoder_layer_flops(patches, width, vision_config.intermediate_size, False, patches)
    return float(num_views * (embed + vision_config.num_hidden_layers * layer))


@dataclass
class PrefillFlops:
    """FLOPs of one prefill (all rows of the batch), by part."""

    vision: float
    projector: float
    language_model: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.language_model


def _vision_layers_run(config, pruned: bool) -> int:
    """LLaVA runs the whole tower unpruned (hidden_states[-2] of a full forward); flashvlm stops at the feature layer."""
    layers = config.vision_config.num_hidden_layers
    if not pruned:
        return layers
    feature = config.vision_feature_layer
    return feature if feature >= 0 else layers + 1 + feature


def llava_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int) -> tuple[float, float]:
    """(vision, projector) FLOPs of LLaVA-1.5: one CLIP view per image, the MLP projector."""
    vision = batch * clip_tower_flops(config.vision_config, 1, _vision_layers_run(config, pruned))
    return vision, batch * llava_projector_flops(config, projected)


def llava_next_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) FLOPs of LLaVA-NeXT: the base view and g x g crops per image."""
    side = patch_grid_side(config.vision_config)
    grid = round(((visual_tokens - side * side) / side**2) ** 0.5)
    views = 1 + grid * grid
    vision = batch * clip_tower_flops(config.vision_config, views, _vision_layers_run(config, pruned))
    return vision, batch * llava_projector_flops(config, projected)


def qwen_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, 0): Qwen2.5-VL's tower with its merger (Qwen projects before any selection can run)."""
    patches = visual_tokens * config.vision_config.spatial_merge_size**2
    return batch * qwen_tower_flops(config.vision_config, patches), 0.0


def qwen3_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, 0): Qwen3-VL's tower with its mergers."""
    patches = visual_tokens * config.vision_config.spatial_merge_size**2
    return batch * qwen3_tower_flops(config.vision_config, patches), 0.0


def gemma3_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) of Gemma 3: the whole SigLIP tower, then the projection of the pooled tokens."""
    projector = 2 * projected * config.vision_config.hidden_size * config.text_config.hidden_size
    return batch * siglip_tower_flops(config.vision_config, 1), float(batch * projector)


def internvl_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) of InternVL: InternViT (CLS included) on every tile of the image,
    the MLP projector (LayerNorm, vision x 4 -> LM hidden -> LM hidden) on the pixel-shuffled rows."""
    tiles = visual_tokens // internvl_tokens_per_tile(config)
    vision = batch * clip_tower_flops(config.vision_config, tiles, _vision_layers_run(config, pruned))
    shuffled, hidden = internvl_feature_width(config), config.text_config.hidden_size
    return vision, float(batch * 2 * projected * (shuffled * hidden + hidden * hidden))


def idefics3_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) of Idefics3/SmolVLM: SigLIP on every sub-image, the connector's one
    linear map on the pixel-shuffled rows. The model's image path projects every row before
    any selection, so the projector counts all ``visual_tokens`` whatever ``projected`` says."""
    views = visual_tokens // idefics3_tokens_per_sub_image(config)
    projector = 2 * visual_tokens * idefics3_feature_width(config) * config.text_config.hidden_size
    return batch * siglip_tower_flops(config.vision_config, views), float(batch * projector)


def llava_next_video_vision_flops(config, visual_tokens: int, pruned: bool, projected: int, batch: int):
    """(vision, projector) of LLaVA-NeXT-Video on a video: the CLIP tower on every frame (the
    resampler's pooling has no matmuls), LLaVA's projector on the pooled rows."""
    frames = visual_tokens // llava_next_video_tokens_per_frame(config)
    vision = batch * clip_tower_flops(config.vision_config, frames, _vision_layers_run(config, pruned))
    return vision, batch * llava_projector_flops(config, projected)


def bipartite_diversity_flops(
    num_candidates: int,
    num_keep: int,
    width: int,
    removal_step: int = 8,
    removal_fraction: float | None = None,
    block_size: int | None = None,
    round_by_round: bool = False,
) -> tuple[float, int]:
    """(FLOPs of the cosine similarities, rounds) of the bipartite diversity step.

    Follows :func:`flashvlm.selection.diversity.bipartite_diverse_subset`'s schedule
    exactly. On one similarity matrix (whole lists, see ``uses_similarity_matrix``) it
    is R^2 C * 2 FLOPs once plus the short lists' rounds, multiplied as released: quadratic
    in N (the rounds' scans are O(R) each and not counted). Round by round (the release's
    way, or ``round_by_round``) it is about (R - K) / removal_step rounds of R^2 C / 2
    FLOPs: cubic in N.
    """
    on_matrix = num_candidates > num_keep > 0 and not round_by_round
    on_matrix = on_matrix and uses_similarity_matrix(num_candidates, block_size)
    remaining, rounds = num_candidates, 0
    flops = 2.0 * num_candidates * num_candidates * width if on_matrix else 0.0
    while remaining > num_keep and num_keep > 0:
        drop = removal_count(remaining, num_keep, removal_step, removal_fraction)
        size_a, size_b = (remaining + 1) // 2, remaining // 2
        if not on_matrix or remaining <= DIRECT_ROUND_PLACES:
            partners = size_b if block_size is None or remaining <= block_size else block_size // 2
            flops += 2.0 * size_a * partners * width
        remaining -= min(drop, size_a)
        rounds += 1
    return flops, rounds


def flashvlm_diversity_flops(
    selector, num_tokens: int, num_keep: int, width: int, round_by_round: bool = False
) -> tuple[float, int] | None:
    """The diversity step's (FLOPs, rounds) for a FlashVLM-like selector, or None for other methods.

    ``round_by_round``: the selector runs the bench's round-by-round rule in place of "bipartite".
    """
    if not round_by_round and getattr(selector, "diversity", None) != "bipartite":
        return None
    num_important = int(selector.important_ratio * num_keep)
    return bipartite_diversity_flops(
        num_tokens - num_important,
        num_keep - num_important,
        width,
        selector.removal_step,
        selector.removal_fraction,
        selector.diversity_block,
        round_by_round,
    )
