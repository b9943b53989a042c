"""FastV: keep the visual tokens the prompt's last token attends to most inside the LM.

Source: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play
Inference Acceleration for Large Vision-Language Models", ECCV 2024; released code
pkunlp-icler/FastV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import SelectionInputs, TokenSelector, check_integer, register


@register
@dataclass
class FastV(TokenSelector):
    """Rank visual tokens by the attention the last prompt token pays them in LM layer ``layer``.

    FastV (released code) runs the first ``layer`` layers on the full sequence (the
    default 2 is the paper's K = 2), takes the last prompt token's attention in the last of
    them, averaged over heads, and drops the least-attended visual tokens from every later
    layer.

    Here every method prunes *before* the language model, so FastV becomes a scoring pass
    plus a pruned prefill: the adapter runs the language model over the full, unpruned
    sequence up to layer ``layer``, computes only the one attention row needed there from
    that layer's own queries and keys (the other layers keep SDPA/FlashAttention), then
    stops; the normal prefill then runs on the K kept tokens in *every* layer. Unlike the
    release, the first ``layer`` layers of the real prefill therefore also see only K
    visual tokens, and the scoring pass is an extra cost: ``layer - 1`` full layers over
    the unpruned sequence plus one layer's q/k projections, counted in the selection time.

    Needs: ``lm_attention`` (any adapter provides it).
    Cost: the partial pass above, then O(N log N) ranking.
    """

    name: ClassVar[str] = "fastv"
    requires: ClassVar[frozenset[str]] = frozenset({"lm_attention"})

    #: K: the language-model layer (1-based) whose attention ranks the visual tokens.
    layer: int = 2

    def __post_init__(self) -> None:
        check_integer("layer", self.layer, 1)

    @property
    def lm_attention_layer(self) -> int:
        return self.layer

    def select(self, inputs: SelectionInputs, num_keep: int):
        return inputs.lm_attention.topk(num_keep, dim=-1).indices
