"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, 1-D RoPE LM.

The pruned prompt gets ordinary contiguous positions, as in the authors' release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import UnsupportedModelError
from ..saliency import query_row_attention, received_attention
from ..selection import Budget, TokenSelector
from .base import (
    ImageSelection,
    ModelAdapter,
    PrunedInputs,
    VisualUnit,
    pad_token_id,
    placeholder_rows,
    prompt_tensors,
    prompt_text,
    rebuild_model_kwargs,
    resolve_hidden_state_layer,
    run_until_tap,
    select_units,
    tap_vision_layer,
)

#: Arguments that only feed the vision side and are consumed by the adapter.
_VISION_ONLY_KWARGS = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")


@dataclass
class EncodedPatches:
    """A CLIP/SigLIP tower's output for a stack of square inputs (images, AnyRes crops or frames)."""

    features: torch.Tensor  # (P, n, C) feature-layer outputs, CLS dropped
    saliency: torch.Tensor | None  # (P, n) float32, or None when not asked for
    keys: torch.Tensor | None  # (P, n, C_k) keys of the feature layer, or None


class LlavaAdapter(ModelAdapter):
    architectures = ("LlavaForConditionalGeneration",)
    vision_only_kwargs: tuple[str, ...] = _VISION_ONLY_KWARGS

    def __init__(self, model, video_budget: str = "per_frame") -> None:
        super().__init__(model, video_budget)
        self.core = model.model  # vision_tower, multi_modal_projector, language_model
        config = model.config
        self.image_token_id = config.image_token_id
        self.pad_token_id = pad_token_id(model)
        vision = getattr(self.core.vision_tower, "vision_model", self.core.vision_tower)
        self.vision_layers = vision.encoder.layers
        # CLIP towers prepend a CLS token (class_embedding); SigLIP towers have none.
        self.has_cls = hasattr(vision.embeddings, "class_embedding")
        self.saliency_kind = "cls" if self.has_cls else "received"
        self.key_heads = self.vision_layers[0].self_attn.num_heads

    def has_visual_input(self, model_kwargs: dict[str, Any]) -> bool:
        return model_kwargs.get("pixel_values") is not None

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
        queries, keys = tap.queries, tap.keys
        if strategy == "default":
            features = features[:, 1:]
        return features, queries, keys

    def encode_patches(
        self, pixel_values: torch.Tensor, model_kwargs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedPatches:
        """Features, saliency and keys of a stack of tower inputs (P, 3, H, W)."""
        feature_layer, strategy = self._feature_settings(model_kwargs)
        need_qk = bool(needs & {"saliency", "cls_attention", "keys"})
        features, queries, keys = self.encode_images(pixel_values, feature_layer, strategy, need_qk)
        if not need_qk:
            return EncodedPatches(features, None, None)
        attention = self.vision_layers[0].self_attn
        # Tokens the strategy keeps: "default" drops the CLS token, "full" keeps every one.
        first_patch = 1 if strategy == "default" else 0
        if self.has_cls:
            saliency = query_row_attention(queries, keys, attention.num_heads, 0, attention.scale)[:, first_patch:]
        else:
            saliency = received_attention(queries, keys, attention.num_heads, attention.scale)
        # Keys only travel on when a method asks for them (they are as wide as the features).
        return EncodedPatches(features, saliency, keys[:, first_patch:] if "keys" in needs else None)

    def prune_inputs(self, model_kwargs: dict[str, Any], selector: TokenSelector, budget: Budget) -> PrunedInputs:
        input_ids, attention_mask = prompt_tensors(model_kwargs)
        needs = selector.requires
        projector = self.core.multi_modal_projector

        # In training, gradients reach the tower and projector through the kept tokens.
        with torch.set_grad_enabled(self.model.training and torch.is_grad_enabled()):
            encoded = self.encode_patches(model_kwargs["pixel_values"], model_kwargs, needs)
            num_images, num_tokens, _ = encoded.features.shape
            rows = placeholder_rows(input_ids, self.image_token_id, [num_tokens] * num_images, "image")
            # FastV-style scoring needs the projected tokens too, to build the unpruned sequence.
            need_projected = bool(needs & {"projected", "lm_attention"})
            projected = projector(encoded.features) if need_projected else None  # (I, N, D)
            lm_attention = None
            if "lm_attention" in needs:
                sent = {self.image_token_id: projected.flatten(0, 1)}
                scores = self.visual_token_attention(input_ids, attention_mask, sent, selector.lm_attention_layer)
                lm_attention = scores[self.image_token_id].view(num_images, num_tokens)
            grid = square_grid(num_tokens) if self._feature_settings(model_kwargs)[1] == "default" else None
            units = [
                VisualUnit(
                    row,
                    budget,
                    encoded.features[i],
                    None if projected is None else projected[i],
                    None if encoded.saliency is None else encoded.saliency[i],
                    None if encoded.keys is None else encoded.keys[i],
                    grid,
                    None if lm_attention is None else lm_attention[i],
                )
                for i, row in enumerate(rows)
            ]
            text = prompt_text(self.model, input_ids, attention_mask, [self.image_token_id], needs)
            choices = select_units(units, selector, self.saliency_kind, *text, key_heads=self.key_heads)
            kept_tokens = []
            for unit, choice in zip(units, choices):
                if choice.features is not None:
                    kept_tokens.append(projector(choice.features))
                elif unit.projected is not None:
                    kept_tokens.append(unit.projected[choice.indices])
                else:
                    kept_tokens.append(projector(unit.features[choice.indices]))  # project only the kept rows

        keep_indices = torch.stack([choice.indices for choice in choices]).to(input_ids.device)  # (I, K)
        is_image = input_ids == self.image_token_id
        keep_placeholder = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=input_ids.device)
        keep_placeholder.scatter_(1, keep_indices, True)
        keep = attention_mask.bool() & ~is_image  # existing padding goes too: rows are re-padded
        keep[is_image] = keep_placeholder.flatten()  # placeholders run image by image, row-major

        outputs = {"image": BaseModelOutputWithPooling(pooler_output=kept_tokens)}
        pruned_kwargs, new_mask = rebuild_model_kwargs(
            model_kwargs, keep, self.vision_only_kwargs, self.pad_token_id, outputs
        )
        records = [ImageSelection(row, num_tokens, choice.indices.cpu(), grid) for row, choice in zip(rows, choices)]
        return PrunedInputs(pruned_kwargs, records, input_ids.shape[1], new_mask.shape[1])


def square_grid(num_tokens: int) -> tuple[int, int] | None:
    """(side, side) when ``num_tokens`` fill a square raster, else None."""
    side = int(round(num_tokens**0.5))
    return (side, side) if side * side == num_tokens else None
