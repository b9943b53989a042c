"""Adapter for Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower, pooled to 256 tokens per image.

The SigLIP tower has no CLS token, so saliency is the attention each patch *receives*
in the last encoder layer (the layer whose output, after the post-layernorm, the model
uses). The projector average-pools the patch raster (e.g. 64 x 64 -> 16 x 16) before its
norm and projection; the vision features, saliency and keys are pooled the same way,
so there is one of each per language-model token, and the pooled features are what the
projector's norm and projection consume.

Gemma 3 lets the tokens of one image attend to each other bidirectionally, from
``token_type_ids`` (1 at image tokens). Those ids are per-token arguments, compacted
with the keep mask like ``input_ids``, so the kept tokens of an image still form one
bidirectional block; the ``lm_attention`` pass builds the model's own mask from them.
Positions stay ordinary 1-D positions over the shortened prompt. Sliding-window layers
are not modelled by the ``lm_attention`` tap (its layer must be a global one for prompts
longer than the window).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from ..pipeline import ImageSelection, TokenRegion, VisualItem
from ..saliency import received_attention
from .base import FamilySupport, ModelAdapter
from .sequence import prompt_tensors
from .shared import needs_projected, needs_query_key
from .taps import tap_vision_layer


class Gemma3Adapter(ModelAdapter):
    architectures = ("Gemma3ForConditionalGeneration",)
    support = FamilySupport(
        "Gemma 3",
        saliency="attention received in the last SigLIP layer, average-pooled like the patches into the 256 tokens",
        budget_unit="image (every image keeps K; image tokens stay one bidirectional block)",
        positions="contiguous",
        lacks=frozenset({"cls_attention"}),
    )
    saliency_kind = "received"

    def __init__(self, model, **settings) -> None:
        super().__init__(model, **settings)
        tower = self.core.vision_tower
        self.saliency_layer = getattr(tower, "vision_model", tower).encoder.layers[-1]
        self.key_heads = self.saliency_layer.self_attn.num_heads
        self.projector = self.core.multi_modal_projector

    def pooled(self, per_patch: torch.Tensor) -> torch.Tensor:
        """The projector's average pooling on (I, P, X) per-patch values -> (I, T, X)."""
        images, _, width = per_patch.shape
        side = self.projector.patches_per_image
        raster = per_patch.transpose(1, 2).reshape(images, width, side, side)
        return self.projector.avg_pool(raster).flatten(2).transpose(1, 2)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector after its pooling: norm, then projection, (K, C) -> (K, D)."""
        normed = self.projector.mm_soft_emb_norm(features)
        return torch.matmul(normed, self.projector.mm_input_projection_weight).type_as(features)

    def visual_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[VisualItem]:
        tower = self.core.vision_tower
        need_qk = needs_query_key(needs)
        with tap_vision_layer(self.saliency_layer, capture_qk=need_qk, stop_after=False) as tap:
            output = tower(pixel_values=model_kwargs["pixel_values"].to(tower.dtype))
        stack = VisualItem("image", self.pooled(output.last_hidden_state))  # (I, T, C)
        if needs_projected(needs):
            stack.tokens = self.project(stack.features)  # (I, T, D)
        if need_qk:
            attention = self.saliency_layer.self_attn
            received = received_attention(tap.queries, tap.keys, attention.num_heads, attention.scale)  # (I, P)
            stack.saliency = self.pooled(received[..., None])[..., 0]  # (I, T): mean over each pooled block
            stack.keys = self.pooled(tap.keys) if "keys" in needs else None
        side = self.projector.tokens_per_side
        positions = torch.arange(side * side, device=stack.features.device)
        items = []
        for image in range(stack.features.shape[0]):
            item = stack.map(lambda tensor, image=image: tensor[image])
            item.units = [ImageSelection.of("image", [TokenRegion(positions, (side, side))])]
            items.append(item)
        return items

    def encoder_output(self, kind: str, items: list[VisualItem]):
        # The model takes one (I, K, D) tensor: every image keeps as many tokens (one budget, N = 256).
        output = super().encoder_output(kind, items)
        output.pooler_output = torch.stack(output.pooler_output)
        return output

    def scoring_kwargs(self, model_kwargs: dict[str, Any], inputs_embeds: torch.Tensor, by_kind) -> dict[str, Any]:
        """The model's own mask mapping: causal, plus each image's bidirectional block."""
        token_type_ids = model_kwargs.get("token_type_ids")
        if token_type_ids is None:
            return {}
        attention_mask = prompt_tensors(model_kwargs)[1]
        mapping = create_masks_for_vision_model(
            config=self.model.config.get_text_config(),
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None,
            position_ids=(attention_mask.long().cumsum(dim=1) - 1).clamp(min=0),
            block_sequence_ids=get_block_sequence_ids_for_mask(token_type_ids, device=inputs_embeds.device),
        )
        return {"attention_mask": mapping}
