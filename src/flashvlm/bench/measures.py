"""Measures of what a selection method kept: how well the kept set covers the tokens, and
how much two kept sets agree."""

from __future__ import annotations

import torch

from ..selection.ops import gather_tokens, max_cosine_to_set


def coverage_radius(unit_features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Largest cosine distance from any token to its nearest kept token, (B,).

    unit_features: (B, N, C) unit rows; keep: (B, K) indices. The kept set is a delta-cover
    of the image's tokens for every delta at least this radius (the paper's claim for the
    diversity step). 0 when everything is kept; up to 2.
    """
    nearest_kept = max_cosine_to_set(unit_features, gather_tokens(unit_features, keep))  # (B, N)
    return (1.0 - nearest_kept.float()).amax(dim=-1).clamp(min=0.0)


def jaccard_agreement(keep: torch.Tensor, reference: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """|keep & reference| / |keep | reference| of two kept sets per image, (B,); 1 when both are empty.

    keep: (B, K), reference: (B, K'), indices below ``num_tokens``.
    """
    kept = torch.zeros(keep.shape[0], num_tokens, dtype=torch.bool, device=keep.device)
    kept.scatter_(1, keep, True)
    referenced = torch.zeros_like(kept).scatter_(1, reference.to(keep.device), True)
    union = (kept | referenced).sum(dim=-1)
    return torch.where(union > 0, (kept & referenced).sum(dim=-1) / union.clamp(min=1), 1.0)
