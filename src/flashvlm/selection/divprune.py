"""DivPrune: the most diverse subset of visual tokens, by greedy max-min distance.

Source: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", CVPR 2025; released code vbdi/divprune.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..errors import FlashVLMError
from .base import SelectionInputs, TokenSelector, check_choice, register
from .diversity import max_min_diverse_subset
from .ops import max_cosine_to_set, unit_rows


@register
@dataclass
class DivPrune(TokenSelector):
    """Greedy max-min diversity (farthest-point selection) on the projected tokens.

    Distance is 1 - cosine. The first token is the most isolated one (largest distance to
    its nearest neighbour), as released; each next token is the one farthest from its
    nearest already-kept token. The release builds the N x N distance matrix and re-takes
    the minimum over all kept tokens at each step (O(K^2 N) time, O(N^2) memory); here a
    running minimum makes the greedy O(K * N * D) time and O(N) memory.

    ``start="isolated"`` (release) needs every token's nearest neighbour once: an
    O(N^2 * D) pass done in chunks (O(chunk * N) memory). ``start="farthest_from_mean"``
    starts from the token least similar to the mean direction instead, making the whole
    method O(K * N * D) (preset ``divprune:linear``).

    The default works in float32; the release in the model's dtype, on its N x N matrix of
    distances ``1 - cos``, where rounding makes near-equal distances tie (broken by the
    first index). ``score_dtype="model"`` (preset ``divprune:release``) computes exactly
    that, O(N^2) memory as released, and keeps the release's tokens
    (tests/test_parity_adapters.py); docs/methods.md gives how often the two differ.

    Needs: the projected tokens.
    """

    name: ClassVar[str] = "divprune"
    requires: ClassVar[frozenset[str]] = frozenset({"projected"})
    presets: ClassVar[dict[str, dict]] = {
        "default": {},
        "linear": {"start": "farthest_from_mean"},
        "release": {"score_dtype": "model"},
    }

    #: How the first token is chosen: "isolated" (release) or "farthest_from_mean".
    start: Literal["isolated", "farthest_from_mean"] = "isolated"
    #: "float32" (default, O(N) memory) or "model": the release's distance matrix in the
    #: model's dtype (O(N^2) memory; needs ``start="isolated"``).
    score_dtype: Literal["float32", "model"] = "float32"

    def __post_init__(self) -> None:
        check_choice("start", self.start, ("isolated", "farthest_from_mean"))
        check_choice("score_dtype", self.score_dtype, ("float32", "model"))
        if self.score_dtype == "model" and self.start != "isolated":
            raise FlashVLMError(
                f"start must be 'isolated' with score_dtype='model' (the release's arithmetic); got {self.start!r}"
            )

    def select(self, inputs: SelectionInputs, num_keep: int):
        if self.score_dtype == "model":
            return released_distance_greedy(unit_rows(inputs.projected), num_keep)
        unit_tokens = unit_rows(inputs.projected.float())  # (B, N, D)
        if self.start == "isolated":
            closeness = max_cosine_to_set(unit_tokens, unit_tokens, exclude_self=True)  # (B, N) nearest neighbour
        else:
            closeness = (unit_tokens @ unit_rows(unit_tokens.mean(dim=1)).unsqueeze(-1)).squeeze(-1)  # (B, N)
        # Candidates in order of isolation: the greedy starts from the first one.
        candidates = closeness.argsort(dim=-1, stable=True)  # (B, N)
        return max_min_diverse_subset(unit_tokens, candidates, num_keep)


def released_distance_greedy(unit_tokens: torch.Tensor, num_keep: int) -> torch.Tensor:
    """DivPrune's greedy as its release computes it, in the dtype of ``unit_tokens`` (B, N, D).

    Distances ``1 - cos`` in one (B, N, N) matrix; the first pick is the token whose
    nearest other token (second-smallest distance in its column) is farthest; each next
    pick maximises the smallest distance to the picks so far, ties to the first index.
    Picked tokens are excluded (the release never re-picks one, as its distance to
    itself is ~0, except on duplicate tokens). O(N^2 D + K N) time, O(N^2) memory.
    Returns (B, num_keep) indices in pick order.
    """
    batch, num_tokens, _ = unit_tokens.shape
    distance = 1.0 - unit_tokens @ unit_tokens.transpose(1, 2)  # (B, N, N)
    rows = torch.arange(batch, device=unit_tokens.device)
    chosen = torch.empty(batch, num_keep, dtype=torch.long, device=unit_tokens.device)
    taken = torch.zeros(batch, num_tokens, dtype=torch.bool, device=unit_tokens.device)
    nearest = distance.topk(2, dim=1, largest=False).values[:, 1]  # (B, N) second-smallest per column
    closest = None
    for step in range(num_keep):
        scores = nearest if closest is None else closest
        pick = scores.masked_fill(taken, float("-inf")).argmax(dim=-1)  # (B,)
        chosen[:, step] = pick
        taken[rows, pick] = True
        picked_rows = distance[rows, pick]  # (B, N)
        closest = picked_rows if closest is None else torch.minimum(closest, picked_rows)
    return chosen
