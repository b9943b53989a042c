"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, 1-D RoPE LM.

The pruned prompt gets ordinary contiguous positions, as in the authors' release.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..pipeline import ImageSelection, TokenRegion, VisualItem, square_grid
from ..saliency import query_row_attention, received_attention, release_cls_attention
from .base import FamilySupport, ModelAdapter
from .shared import needs_projected, needs_query_key
from .taps import resolve_hidden_state_layer, run_until_tap, tap_vision_layer


class LlavaAdapter(ModelAdapter):
    architectures = ("LlavaForConditionalGeneration",)
    support = FamilySupport(
        "LLaVA-1.5",
        saliency="CLS attention row of the feature layer (-2)",
        budget_unit="image",
        positions="contiguous over the shortened prompt (as the release)",
    )
    vision_only_kwargs = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    def __init__(self, model, **settings) -> None:
        super().__init__(model, **settings)
        vision = getattr(self.core.vision_tower, "vision_model", self.core.vision_tower)
        self.vision_layers = vision.encoder.layers
        # CLIP towers prepend a CLS token (class_embedding); SigLIP towers have none.
        self.has_cls = hasattr(vision.embeddings, "class_embedding")
        self.saliency_kind = "cls" if self.has_cls else "received"
        self.key_heads = self.vision_layers[0].self_attn.num_heads

    def _feature_settings(self, model_kwargs: dict[str, Any]) -> tuple[int, str]:
        config = self.model.config
        layer = model_kwargs.get("vision_feature_layer")
        layer = config.vision_feature_layer if layer is None else layer
        strategy = model_kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if not isinstance(layer, int):
            raise UnsupportedModelError(
                f"vision_feature_layer={layer!r}: flashvlm supports one feature layer (an int), as LLaVA-1.5 uses"
            )
        return layer, strategy

    def encode_images(self, pixel_values: torch.Tensor, feature_layer: int, strategy: str, need_qk: bool):
        """Vision features of the feature layer and, if asked, that layer's queries and keys.

        Returns features (I, N, C) and queries/keys (I, S, C) (S = N + 1 with a CLS token
        that the "default" strategy drops), or None for queries/keys.
        """
        layer_index = resolve_hidden_state_layer(feature_layer, len(self.vision_layers))
        tower = self.core.vision_tower
        with tap_vision_layer(self.vision_layers[layer_index], capture_qk=need_qk, stop_after=True) as tap:
            run_until_tap(tower, pixel_values.to(tower.dtype))
        features = tap.output
        if strategy == "default":
            features = features[:, 1:]
        return features, tap.queries, tap.keys

    def encode_patches(self, pixel_values: torch.Tensor, model_kwargs: dict[str, Any], needs: frozenset[str]):
        """A :class:`VisualItem` over a stack of tower inputs (P, 3, H, W): features (P, n, C),
        and saliency (P, n) and keys (P, n, C_k) where ``needs`` asks for them."""
        feature_layer, strategy = self._feature_settings(model_kwargs)
        need_qk = needs_query_key(needs)
        features, queries, keys = self.encode_images(pixel_values, feature_layer, strategy, need_qk)
        stack = VisualItem("image", features)
        if not need_qk:
            return stack
        attention = self.vision_layers[0].self_attn
        # Tokens the strategy keeps: "default" drops the CLS token, "full" keeps every one.
        first_patch = 1 if strategy == "default" else 0
        if self.has_cls and "release_saliency" in needs:
            # As the release's tower computes it, in the tower's dtype (the release presets).
            stack.saliency = release_cls_attention(queries, keys, attention.num_heads, attention.scale, first_patch)
        elif self.has_cls:
            stack.saliency = query_row_attention(queries, keys, attention.num_heads, 0, attention.scale)[
                :, first_patch:
            ]
        else:
            stack.saliency = received_attention(queries, keys, attention.num_heads, attention.scale)
        # Keys only travel on when a method asks for them (they are as wide as the features).
        stack.keys = keys[:, first_patch:] if "keys" in needs else None
        return stack

    def visual_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[VisualItem]:
        stack = self.encode_patches(model_kwargs["pixel_values"], model_kwargs, needs)
        # FastV-style scoring needs the projected tokens too, to build the unpruned sequence.
        if needs_projected(needs):
            stack.tokens = self.project(stack.features)  # (I, N, D)
        num_tokens = stack.features.shape[1]
        grid = square_grid(num_tokens) if self._feature_settings(model_kwargs)[1] == "default" else None
        positions = torch.arange(num_tokens, device=stack.features.device)
        items = []
        for image in range(stack.features.shape[0]):
            item = stack.map(lambda tensor, image=image: tensor[image])
            item.units = [ImageSelection.of("image", [TokenRegion(positions, grid)])]
            items.append(item)
        return items
