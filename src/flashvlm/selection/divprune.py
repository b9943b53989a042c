"""DivPrune: the most diverse subset of visual tokens, by greedy max-min distance.

Source: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", CVPR 2025; released code vbdi/divprune.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

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

    Needs: the projected tokens.
    """

    name: ClassVar[str] = "divprune"
    requires: ClassVar[frozenset[str]] = frozenset({"projected"})
    presets: ClassVar[dict[str, dict]] = {"default": {}, "linear": {"start": "farthest_from_mean"}}

    #: How the first token is chosen: "isolated" (release) or "farthest_from_mean".
    start: Literal["isolated", "farthest_from_mean"] = "isolated"

    def __post_init__(self) -> None:
        check_choice("start", self.start, ("isolated", "farthest_from_mean"))

    def select(self, inputs: SelectionInputs, num_keep: int):
        unit_tokens = unit_rows(inputs.projected.float())  # (B, N, D)
        if self.start == "isolated":
            closeness = max_cosine_to_set(unit_tokens, unit_tokens, exclude_self=True)  # (B, N) nearest neighbour
        else:
            closeness = (unit_tokens @ unit_rows(unit_tokens.mean(dim=1)).unsqueeze(-1)).squeeze(-1)  # (B, N)
        # Candidates in order of isolation: the greedy starts from the first one.
        candidates = closeness.argsort(dim=-1, stable=True)  # (B, N)
        return max_min_diverse_subset(unit_tokens, candidates, num_keep)
