"""VisPruner: important tokens by CLS attention, then diverse ones by bipartite removal.

Source: Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs", ICCV 2025; released code Theia-4869/VisPruner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import SelectionInputs, TokenSelector, check_integer, check_range, register
from .diversity import important_and_diverse
from .ops import unit_rows


@register
@dataclass
class VisPruner(TokenSelector):
    """Keep the top ``floor(important_ratio * K)`` tokens by CLS attention, then remove
    duplicates from the rest by the same iterative bipartite matching FlashVLM uses
    (``removal_step`` most redundant per round, cosine of the vision features).

    FlashVLM is this method with text relevance fused into the ranking; comparing the two
    isolates what the text adds.

    Needs: the CLS attention row (mean over heads, feature layer).
    Cost per image: O(N log N) ranking; the diversity step O(R^2 C) once for the
    similarity matrix, then about (N - K) / removal_step rounds of O(R) (memory O(R^2)).
    """

    name: ClassVar[str] = "vispruner"
    requires: ClassVar[frozenset[str]] = frozenset({"cls_attention"})

    #: r: share of the budget filled by the most-attended tokens; the rest is the diverse set.
    important_ratio: float = 0.5
    #: Most redundant tokens removed per round of the bipartite step (8 in the release).
    removal_step: int = 8

    def __post_init__(self) -> None:
        check_range("important_ratio", self.important_ratio, 0.0, 1.0)
        check_integer("removal_step", self.removal_step, 1)

    def select(self, inputs: SelectionInputs, num_keep: int):
        ranking = inputs.saliency.argsort(dim=-1, descending=True, stable=True)  # (B, N)
        unit_features = unit_rows(inputs.features.float())  # (B, N, C)
        return important_and_diverse(
            ranking, unit_features, num_keep, self.important_ratio, "bipartite", removal_step=self.removal_step
        )
