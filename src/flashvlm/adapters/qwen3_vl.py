"""Adapter for Qwen3-VL (``Qwen3VLForConditionalGeneration``, and the MoE
``Qwen3VLMoeForConditionalGeneration``, whose vision side is the same): Qwen's packed ViT, plus DeepStack.

Everything of :mod:`.qwen_vl` holds (packed images and videos, saliency as attention
received in the last block averaged over each 2x2 merge group, M-RoPE positions sliced
from the unpruned prompt's). Qwen3-VL adds DeepStack: the tower also merges the hidden
states of a few intermediate blocks into one (M, D) tensor each, which the language
model adds to the visual positions' hidden states after its first decoder layers. Those
features are pruned with the same keep mask as the visual tokens, so a kept token keeps
its own DeepStack features at every layer; the ``lm_attention`` scoring pass gets them
too, as the model's own forward does. A merging method's replacement token keeps the
DeepStack features of the position it stands at.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from ..pipeline import VisualItem
from .base import FamilySupport
from .qwen_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    architectures = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    support = FamilySupport(
        "Qwen3-VL (dense and MoE)",
        saliency="as Qwen2.5-VL (last block); DeepStack features pruned with the same keep mask",
        budget_unit="image, or video frame / whole video",
        positions="as Qwen2.5-VL (unpruned M-RoPE ids, sliced)",
        lacks=frozenset({"cls_attention"}),
    )

    def __init__(self, model, **settings) -> None:
        super().__init__(model, **settings)
        self.deepstack_names = [f"deepstack_{layer}" for layer in range(len(self.tower.deepstack_visual_indexes))]

    def tower_side_outputs(self, output) -> dict[str, torch.Tensor]:
        return dict(zip(self.deepstack_names, output.deepstack_features))  # (M, D) each

    def encoder_output(self, kind: str, items: list[VisualItem]) -> BaseModelOutputWithDeepstackFeatures:
        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=[item.sent for item in items],
            deepstack_features=[[item.sent_side_outputs[name] for item in items] for name in self.deepstack_names],
        )

    def scoring_kwargs(
        self, model_kwargs: dict[str, Any], inputs_embeds: torch.Tensor, by_kind: dict[str, list[VisualItem]]
    ) -> dict[str, Any]:
        """DeepStack features at every visual position of the unpruned prompt, images and
        videos interleaved as they sit in it (as the model's forward assembles them)."""
        input_ids = model_kwargs["input_ids"]
        is_kind = {kind: input_ids == self.token_ids[kind] for kind in by_kind}  # (B, L) each
        is_visual = torch.stack(list(is_kind.values())).any(dim=0)  # (B, L)
        deepstack = []
        for name in self.deepstack_names:
            per_kind = {kind: torch.cat([item.side_outputs[name] for item in items]) for kind, items in by_kind.items()}
            width = next(iter(per_kind.values())).shape[-1]
            joint = inputs_embeds.new_zeros(int(is_visual.sum()), width)  # (T, D) in sequence order
            for kind, features in per_kind.items():
                joint[is_kind[kind][is_visual]] = features.to(joint.dtype)
            deepstack.append(joint)
        return dict(visual_pos_masks=is_visual, deepstack_visual_embeds=deepstack)
