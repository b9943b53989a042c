"""CDPruner: a conditional DPP over visual tokens, relevance x similarity, greedy MAP.

Source: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity
for Token Pruning in MLLMs", NeurIPS 2025; released code Theia-4869/CDPruner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .base import SelectionInputs, TokenSelector, check_range, register
from .flashvlm import text_relevance
from .ops import dpp_greedy_map, minmax, unit_rows


@register
@dataclass
class CDPruner(TokenSelector):
    """Most diverse *relevant* subset: the MAP of a DPP with kernel ``q_i cos(v_i, v_j) q_j``.

    Similarity: cosine of the projected tokens. Relevance: mean cosine of each projected
    token to the prompt's text embeddings in the language model's input space (the same
    text FlashVLM uses), min-max normalised per image to the quality ``q``. The release on
    LLaVA-1.5 takes relevance from CLIP's own image/text embeddings and *negates* it (an
    effect its authors report only for CLIP); ``negate_relevance=True`` reproduces the sign.
    The release normalises over the whole batch; here per image, so batch rows stay
    independent.

    Needs: the prompt's text embeddings and the projected tokens.
    Cost per image: O(N * L * D) relevance; greedy MAP by incremental Cholesky without
    building the N x N kernel: O(K * N * (D + K)) time, O(K * N) memory.
    """

    name: ClassVar[str] = "cdpruner"
    requires: ClassVar[frozenset[str]] = frozenset({"text", "projected"})
    presets: ClassVar[dict[str, dict]] = {"default": {}, "release_sign": {"negate_relevance": True}}

    #: Use minus the relevance, as the LLaVA-1.5 release does with CLIP embeddings.
    negate_relevance: bool = False
    #: Floor added to the quality so the least relevant token keeps a non-zero kernel row.
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_range("eps", self.eps, 0.0, math.inf, low_open=True)

    def select(self, inputs: SelectionInputs, num_keep: int):
        projected = inputs.projected.float()  # (B, N, D)
        relevance = text_relevance(projected, inputs.text_embeds.float(), inputs.text_mask, aggregation="mean")
        quality = minmax(-relevance if self.negate_relevance else relevance) + self.eps  # (B, N)
        return dpp_greedy_map(unit_rows(projected), quality, num_keep)
