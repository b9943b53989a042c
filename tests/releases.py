"""Plain restatements of the released selection code of every method we claim parity with.

Each function restates, operation by operation and in the dtype of the tensors it is
given, what the authors' code computes, written for these tests (never the released
code itself). The parity tests run them on the tensors an adapter hands a selector and
compare kept indices exactly; ``lab/release_agreement.py`` measures how far our
defaults are from them.

- FlashVLM LLaVA: CaiKaitong/FlashVLM, ``llava/model/llava_arch.py`` ``encode_images``;
  its saliency, ``llava/model/multimodal_encoder/clip_encoder.py`` ``feature_select``,
  from the attention map transformers 4.37.2's ``CLIPAttention`` returns (the version
  LLaVA pins), restated in :func:`released_clip_cls_attention`;
- FlashVLM Qwen2.5-VL: the same repository, ``Qwen2_5VL/flashvlm_qwen_2_5_VL.py``, the
  selection inside ``Qwen2_5_VLForConditionalGeneration.forward``;
- VisPruner: Theia-4869/VisPruner, ``llava/model/llava_arch.py`` ``encode_images``;
- VisionZip: dvlab-research/VisionZip, ``visionzip/clip_encoder.py`` ``forward``;
- DivPrune: vbdi/divprune, ``LLaVA/llava/model/llava_arch.py`` ``DivPrune``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def released_clip_cls_attention(layer: nn.Module, layer_input: torch.Tensor, first_patch: int = 1) -> torch.Tensor:
    """The LLaVA releases' saliency: the CLS row of one CLIP layer's attention, mean over heads.

    layer: a CLIP encoder layer (``layer_norm1``, ``self_attn`` with ``q_proj``/``k_proj``,
    ``num_heads``, ``scale``); layer_input: (B, S, C) its input hidden states. Restates the
    eager ``CLIPAttention.forward`` of transformers 4.37.2 up to the probabilities it returns
    with ``output_attentions=True`` (q scaled *before* the product, ``torch.bmm``, softmax
    without upcast, everything in the tower's dtype), then the release's
    ``attentions[:, :, 0, 1:]`` (``feature_select``, strategy "patch") and
    ``.mean(dim=1)`` (``encode_images``), still in that dtype. Returns (B, S - first_patch).
    """
    attention = layer.self_attn
    hidden = layer.layer_norm1(layer_input)
    bsz, tgt_len, embed_dim = hidden.size()
    heads = attention.num_heads
    head_dim = embed_dim // heads

    def shape(tensor: torch.Tensor) -> torch.Tensor:  # CLIPAttention._shape
        return tensor.view(bsz, -1, heads, head_dim).transpose(1, 2).contiguous()

    query_states = attention.q_proj(hidden) * attention.scale
    key_states = shape(attention.k_proj(hidden))
    proj_shape = (bsz * heads, -1, head_dim)
    query_states = shape(query_states).view(*proj_shape)
    key_states = key_states.view(*proj_shape)
    src_len = key_states.size(1)
    attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights_reshaped = attn_weights.view(bsz, heads, tgt_len, src_len)
    return attn_weights_reshaped[:, :, 0, first_patch:].mean(dim=1)


def released_minmax(values: torch.Tensor) -> torch.Tensor:
    low, high = values.amin(dim=-1, keepdim=True), values.amax(dim=-1, keepdim=True)
    return (values - low) / (high - low + 1e-6)


def released_text_relevance(unit_tokens: torch.Tensor, text: torch.Tensor, gate_on_raw_norms: bool) -> torch.Tensor:
    """One image's sharpened relevance, float32 (N,). unit_tokens: (N, D) unit rows; text: (L, D).

    The LLaVA release computes the norm gate after normalising the text (lengths ~1);
    the Qwen release on the raw embeddings. An image without text gets zeros.
    """
    if text.shape[0] == 0:
        return torch.zeros(unit_tokens.shape[0], dtype=torch.float32)
    unit_text = F.normalize(text, dim=-1)
    lengths = (text if gate_on_raw_norms else unit_text).norm(dim=-1)
    unit_text = unit_text * (lengths / (lengths.max() + 1e-6)).unsqueeze(-1)
    similarity = unit_tokens @ unit_text.transpose(0, 1)  # (N, L)
    relevance = (similarity * F.softmax(similarity / 0.05, dim=-1)).sum(dim=-1)
    relevance = F.softmax(relevance / 0.010, dim=0) ** 2.5
    relevance = released_minmax(relevance).float()
    threshold = torch.quantile(relevance, 1 - 0.005)
    relevance = torch.where(relevance >= threshold, relevance, relevance * 0.1)
    return released_minmax(relevance)


def released_fusion(saliency: torch.Tensor, relevance: torch.Tensor, eta: float = 0.5) -> torch.Tensor:
    """Log-domain fusion as released: the saliency term in its own dtype, the sum in float32."""
    attention = released_minmax(saliency).clamp(min=1e-6)
    score = torch.exp((1 - eta) * torch.log(attention) + eta * torch.log(relevance.clamp(min=1e-6)))
    return released_minmax(score)


def released_bipartite(unit_features: torch.Tensor, residual: torch.Tensor, num_diverse: int) -> torch.Tensor:
    """The released diversity loop, (B, R) -> (B, num_diverse), torch's default sort."""
    rows = torch.arange(residual.shape[0]).unsqueeze(-1)
    while True:
        tokens = unit_features[rows, residual]  # (B, R, C)
        r = min(8, tokens.shape[1] - num_diverse)
        if r <= 0:
            return residual
        a, b = tokens[..., ::2, :], tokens[..., 1::2, :]
        redundancy = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = redundancy.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat([residual[..., ::2][rows, distinct], residual[..., 1::2]], dim=-1)


def released_flashvlm_llava(features, cls_attention, projected, text_per_image, budget):
    """Kept indices (B, budget), ascending. text_per_image: B tensors (L_b, D) of each image's prompt text."""
    num_important = int(budget * 0.5)
    unit_projected = F.normalize(projected, dim=-1)
    relevance = torch.stack(
        [released_text_relevance(unit_projected[b], text, False) for b, text in enumerate(text_per_image)]
    )
    order = released_fusion(cls_attention, relevance).argsort(dim=-1, descending=True)
    diverse = released_bipartite(F.normalize(features, dim=-1), order[:, num_important:], budget - num_important)
    return torch.sort(torch.cat([order[:, :num_important], diverse], dim=-1), dim=-1).values


def released_flashvlm_qwen(merged, received, text_before_image, budget):
    """One image of the Qwen2.5-VL release: kept indices (budget,), ascending.

    merged: (N, D) merger outputs; received: (N,) saliency; text_before_image: (L, D) the
    embeddings of the prompt tokens before the first image token.
    """
    num_important = int(0.5 * budget)
    relevance = released_text_relevance(F.normalize(merged, dim=-1), text_before_image, True)
    order = released_fusion(received, relevance).argsort(descending=True)
    diverse = released_bipartite(F.normalize(merged, dim=-1)[None], order[None, num_important:], budget - num_important)
    return torch.sort(torch.cat([order[:num_important], diverse[0]])).values


def released_vispruner(features, cls_attention, budget, important_ratio=0.5):
    """Kept indices (B, budget), ascending: CLS attention ranking, then the bipartite loop."""
    num_important = int(budget * important_ratio)
    order = cls_attention.argsort(dim=-1, descending=True)
    unit_features = features / features.norm(dim=-1, keepdim=True)
    diverse = released_bipartite(unit_features, order[:, num_important:], budget - num_important)
    return torch.sort(torch.cat([order[:, :num_important], diverse], dim=-1), dim=-1).values


def released_visionzip(features, cls_attention, metric, num_dominant, num_contextual):
    """One image of the VisionZip release, without its CLS token.

    features: (N, C); cls_attention: (N,); metric: (N, d) keys, mean over heads. Returns
    the dominant indices in raster order (the release's masked_select), the target
    indices of the contextual tokens, and the tokens (dominant rows, then contextual:
    target + mean of the members assigned to it).
    """
    dominant = cls_attention.topk(num_dominant).indices
    is_remaining = torch.ones(features.shape[0], dtype=torch.bool)
    is_remaining[dominant] = False
    remaining = is_remaining.nonzero().flatten()  # raster order
    unit_metric = metric[remaining] / metric[remaining].norm(dim=-1, keepdim=True)
    step = max(1, len(remaining) // num_contextual)
    target_places = torch.arange(0, len(remaining), step)[:num_contextual]
    is_member = ~torch.isin(torch.arange(len(remaining)), target_places)
    nearest = (unit_metric[is_member] @ unit_metric[target_places].T).argmax(dim=-1)
    assignment = F.one_hot(nearest, num_contextual).to(features.dtype)  # (M, K_ctx)
    counts = assignment.sum(dim=0).clamp(min=1).unsqueeze(-1)
    contextual = features[remaining[target_places]] + assignment.T @ features[remaining[is_member]] / counts
    dominant_raster = is_remaining.logical_not().nonzero().flatten()
    return dominant_raster, remaining[target_places], torch.cat([features[dominant_raster], contextual])


def released_divprune(projected, num_keep):
    """One image of the DivPrune release, in the dtype given: kept indices, ascending."""
    unit = projected / projected.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.t()
    chosen = []
    for step in range(num_keep):
        if step == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = distance[torch.tensor(chosen)].min(dim=0).values
        chosen.append(int(scores.argmax()))
    return sorted(chosen)
