"""VisPruner: important tokens by CLS attention, then diverse ones by bipartite removal.

Source: Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs", ICCV 2025; released code Theia-4869/VisPruner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .base import (
    SelectionInputs,
    TokenSelector,
    check_choice,
    check_integer,
    check_range,
    register,
    requirements_for,
    requirements_with_arithmetic,
)
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

    The default ranks in float32 and breaks exact ties by position, so it keeps the same
    tokens on every device; the release sorts with torch's default (unstable) sort in the
    model's dtype, the CLS row as its tower computes it in that dtype, which preset
    ``vispruner:release`` reproduces exactly on LLaVA (tests/test_parity_adapters.py). How
    often the two differ: docs/methods.md.

    Needs: the CLS attention row (mean over heads, feature layer), or with
    ``saliency_kind="any"`` (preset ``vispruner:received``) any saliency.
    Cost per image: O(N log N) ranking; the diversity step O(R^2 C) once for the
    similarity matrix, then about (N - K) / removal_step rounds of O(R) (memory O(R^2)).
    """

    name: ClassVar[str] = "vispruner"
    requires: ClassVar[frozenset[str]] = frozenset({"cls_attention"})
    presets: ClassVar[dict[str, dict]] = {
        "default": {},
        # The released code: the CLS row as the release's tower computes it (transformers
        # 4.37.2's eager attention, in the tower's dtype), features in the model's dtype,
        # unstable sorts.
        "release": {"score_dtype": "model", "stable_ranking": False, "saliency_arithmetic": "release"},
        # Attention received stands in for the CLS row, so towers without CLS can run it.
        "received": {"saliency_kind": "any"},
    }

    #: r: share of the budget filled by the most-attended tokens; the rest is the diverse set.
    important_ratio: float = 0.5
    #: Most redundant tokens removed per round of the bipartite step (8 in the release).
    removal_step: int = 8
    #: Dtype of the ranking and of the features compared: "float32" or "model" (release).
    score_dtype: Literal["float32", "model"] = "float32"
    #: Break exact ties by position (True) or as torch's default sort does (False, release).
    stable_ranking: bool = True
    #: Which saliency ranks the tokens: "cls" (the CLS attention row, as released) or "any"
    #: (whatever the adapter gives: attention received on towers without a CLS token, such
    #: as SigLIP, the Qwen ViT or InternVL; the CLS row on CLIP). Preset ``received``.
    saliency_kind: Literal["cls", "any"] = "cls"
    #: How the adapter computes the CLS row: "float32" (default) or "release" (as the
    #: release's tower does, in the tower's dtype; see ``FlashVLM.saliency_arithmetic``).
    saliency_arithmetic: Literal["float32", "release"] = "float32"

    def __post_init__(self) -> None:
        check_range("important_ratio", self.important_ratio, 0.0, 1.0)
        check_integer("removal_step", self.removal_step, 1)
        check_choice("score_dtype", self.score_dtype, ("float32", "model"))
        check_choice("stable_ranking", self.stable_ranking, (True, False))
        check_choice("saliency_kind", self.saliency_kind, ("cls", "any"))
        self.requires = requirements_with_arithmetic(
            requirements_for(type(self).requires, self.saliency_kind), self.saliency_arithmetic
        )

    def select(self, inputs: SelectionInputs, num_keep: int):
        features = inputs.features if self.score_dtype == "model" else inputs.features.float()  # (B, N, C)
        saliency = inputs.saliency.to(features.dtype)  # the release's attention map is in the model's dtype
        ranking = saliency.argsort(dim=-1, descending=True, stable=self.stable_ranking)  # (B, N)
        return important_and_diverse(
            ranking,
            unit_rows(features),
            num_keep,
            self.important_ratio,
            "bipartite",
            removal_step=self.removal_step,
            stable=self.stable_ranking,
        )
