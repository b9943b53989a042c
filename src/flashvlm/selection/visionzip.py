"""VisionZip: dominant tokens by CLS attention, the rest merged into a few contextual tokens.

Source: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", CVPR 2025; released code dvlab-research/VisionZip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from .base import Selection, SelectionInputs, TokenSelector, check_choice, check_range, register, requirements_for
from .ops import gather_tokens, unit_rows


@register
@dataclass
class VisionZip(TokenSelector):
    """Keep the tokens the CLS token attends to most, and merge the rest by key similarity.

    1. Dominant: the top ``K - K_ctx`` tokens by CLS attention (feature layer, mean over heads).
    2. Contextual: the remaining tokens, in raster order, are split into ``K_ctx`` targets
       (every ``R // K_ctx``-th one, as released) and the rest; each of the rest joins the
       target whose key (mean over heads, the release's "metric") is most cosine-similar;
       a contextual token is its target's features plus the mean of its members' features,
       as released (a target without members stays as it is).
    The release counts the CLS token among the dominant ones (54 + 10 = 64); the CLS token
    is not a LLaVA visual token here, so all K are patch tokens, and ``contextual_ratio``
    defaults to the release's 10/64 (10, 20, 30 contextual tokens at K = 64, 128, 192).
    The release emits the dominant tokens in raster order, then the contextual tokens in
    target order; here every token, merged ones at their target's position, is in raster
    order (only the order in which the language model sees the contextual tokens differs).

    ``saliency_kind="any"`` (preset ``visionzip:received``) ranks by whatever saliency the
    adapter gives instead of the CLS row: attention received on towers without a CLS token
    (SigLIP, the Qwen ViT, InternVL), so the method runs on every family.

    Needs: the CLS attention row (or any saliency) and the feature layer's keys.
    Cost per image: O(N log N) ranking, O(R * K_ctx * d) assignment, O(N * C) merging;
    O(R * K_ctx) extra memory.
    """

    name: ClassVar[str] = "visionzip"
    requires: ClassVar[frozenset[str]] = frozenset({"cls_attention", "keys"})
    presets: ClassVar[dict[str, dict]] = {"default": {}, "received": {"saliency_kind": "any"}}

    #: Share of the budget given to contextual (merged) tokens: round(K * ratio) of them.
    contextual_ratio: float = 10 / 64
    #: Which saliency picks the dominant tokens: "cls" (the CLS attention row, as released)
    #: or "any" (whatever the adapter gives: attention received without a CLS token).
    saliency_kind: Literal["cls", "any"] = "cls"

    def __post_init__(self) -> None:
        check_range("contextual_ratio", self.contextual_ratio, 0.0, 1.0)
        check_choice("saliency_kind", self.saliency_kind, ("cls", "any"))
        self.requires = requirements_for(type(self).requires, self.saliency_kind)

    def select(self, inputs: SelectionInputs, num_keep: int) -> Selection:
        features = inputs.features  # (B, N, C)
        batch, num_tokens, _ = features.shape
        num_contextual = round(num_keep * self.contextual_ratio)
        num_dominant = num_keep - num_contextual
        ranking = inputs.saliency.argsort(dim=-1, descending=True, stable=True)  # (B, N)
        dominant = ranking[:, :num_dominant]
        if num_contextual == 0:
            return Selection(dominant)

        is_dominant = torch.zeros(batch, num_tokens, dtype=torch.bool, device=features.device)
        is_dominant.scatter_(1, dominant, True)
        # A stable sort of "is dominant" lists the remaining tokens first, in raster order.
        remaining = is_dominant.to(torch.int8).argsort(dim=1, stable=True)[:, : num_tokens - num_dominant]  # (B, R)
        num_remaining = remaining.shape[1]
        step = max(1, num_remaining // num_contextual)
        target_places = torch.arange(0, num_remaining, step, device=features.device)[:num_contextual]  # (K_ctx,)
        is_target = torch.zeros(num_remaining, dtype=torch.bool, device=features.device)
        is_target[target_places] = True
        targets = remaining[:, is_target]  # (B, K_ctx)
        members = remaining[:, ~is_target]  # (B, R - K_ctx)

        keys = inputs.keys.float()
        heads = inputs.key_heads or 1
        metric = unit_rows(keys.view(batch, num_tokens, heads, -1).mean(dim=2))  # (B, N, d)
        similarity = gather_tokens(metric, members) @ gather_tokens(metric, targets).transpose(1, 2)  # (B, M, K_ctx)
        assignment = F.one_hot(similarity.argmax(dim=-1), num_contextual).to(features.dtype)  # (B, M, K_ctx)
        member_sums = assignment.transpose(1, 2) @ gather_tokens(features, members)  # (B, K_ctx, C)
        counts = assignment.sum(dim=1).clamp(min=1)  # (B, K_ctx)
        contextual = gather_tokens(features, targets) + member_sums / counts.unsqueeze(-1)  # (B, K_ctx, C)

        indices = torch.cat([dominant, targets], dim=1)  # (B, K)
        return Selection(indices, torch.cat([gather_tokens(features, dominant), contextual], dim=1))
