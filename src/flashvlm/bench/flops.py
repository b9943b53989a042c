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


def encoder_layer_flops(tokens: int, width: int, inner: int, gated: bool, attended: int) -> float:
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


def clip_tower_flops(vision_config, num_views: int, layers_run: int) -> float:
    """A tower with a CLS token (CLIP, InternViT) on ``num_views`` images of image_size px,
    running ``layers_run`` layers."""
    patches = patch_grid_side(vision_config) ** 2
    tokens = patches + 1  # CLS
    width = vision_config.hidden_size
    embed = 2 * patches * 3 * square_size(vision_config.patch_size) ** 2 * width
    layer = encoder_layer_flops(tokens, width, vision_config.intermediate_size, False, tokens)
    return float(num_views * (embed + layers_run * layer))


def siglip_tower_flops(vision_config, num_views: int) -> float:
    """A SigLIP tower (no CLS token) on ``num_views`` images, every layer run."""
    patches = patch_grid_side(vision_config) ** 2
    width = vision_config.hidden_size
    embed = 2 * patches * 3 * square_size(vision_config.patch_size) ** 2 * width
    layer = encoder_layer_flops(patches, width, vision_config.intermediate_size, False, patches)
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
