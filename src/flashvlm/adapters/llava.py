"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, 1-D RoPE LM.

The pruned prompt gets ordinary contiguous positions, as in the authors' release.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import FlashVLMError, UnsupportedModelError
from ..saliency import query_row_attention, received_attention
from ..selection import Budget, SelectionInputs, TokenSelector
from ..selection.ops import gather_tokens
from .base import (
    ImageSelection,
    ModelAdapter,
    PrunedInputs,
    compact_sequences,
    resolve_hidden_state_layer,
    run_until_tap,
    tap_vision_layer,
    text_embeddings,
)

#: Fill values for per-token arguments when rows are re-padded.
_PER_TOKEN_FILL = {"labels": -100}
#: Arguments that only feed the vision side and are consumed by the adapter.
_VISION_ONLY_KWARGS = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")


class LlavaAdapter(ModelAdapter):
    architectures = ("LlavaForConditionalGeneration",)

    def __init__(self, model) -> None:
        super().__init__(model)
        self.core = model.model  # LlavaModel: vision_tower, multi_modal_projector, language_model
        config = model.config
        self.image_token_id = config.image_token_id
        self.pad_token_id = _pad_token_id(model)
        vision = getattr(self.core.vision_tower, "vision_model", self.core.vision_tower)
        self.vision_layers = vision.encoder.layers
        # CLIP towers prepend a CLS token (class_embedding); SigLIP towers have none.
        self.has_cls = hasattr(vision.embeddings, "class_embedding")

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

    def prune_inputs(self, model_kwargs: dict[str, Any], selector: TokenSelector, budget: Budget) -> PrunedInputs:
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None:
            raise FlashVLMError("flashvlm needs input_ids (not only inputs_embeds) to find the image placeholders")
        pixel_values = model_kwargs["pixel_values"]
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feature_layer, strategy = self._feature_settings(model_kwargs)
        needs = selector.requires
        need_qk = bool(needs & {"saliency", "cls_attention", "keys"})

        with torch.no_grad():
            features, queries, keys = self.encode_images(pixel_values, feature_layer, strategy, need_qk)
            num_images, num_tokens, _ = features.shape
            image_rows = self._image_rows(input_ids, num_images, num_tokens)

            inputs = SelectionInputs(features=features, grid_shape=_square_grid(num_tokens))
            if need_qk:
                num_heads = self.vision_layers[0].self_attn.num_heads
                scale = self.vision_layers[0].self_attn.scale
                first_patch = 1 if strategy == "default" else 0
                if self.has_cls:
                    inputs.saliency = query_row_attention(queries, keys, num_heads, 0, scale)[:, first_patch:]
                    inputs.saliency_kind = "cls"
                else:
                    inputs.saliency = received_attention(queries, keys, num_heads, scale)
                    inputs.saliency_kind = "received"
                inputs.keys = keys[:, first_patch:]
                inputs.key_heads = num_heads
            projector = self.core.multi_modal_projector
            if needs & {"projected", "lm_attention"}:
                inputs.projected = projector(features)  # (I, N, D)
            if "lm_attention" in needs:
                is_image = attention_mask.bool() & (input_ids == self.image_token_id)
                inputs.lm_attention = self.visual_token_attention(
                    input_ids, attention_mask, is_image, inputs.projected, selector.lm_attention_layer
                )
            if "text" in needs:
                is_text = attention_mask.bool() & (input_ids != self.image_token_id)
                text_embeds, text_mask = text_embeddings(self.model.get_input_embeddings(), input_ids, is_text)
                inputs.text_embeds, inputs.text_mask = text_embeds[image_rows], text_mask[image_rows]

            selection = selector(inputs, budget)
            keep_indices = selection.indices  # (I, K)
            if selection.features is not None:
                kept_tokens = projector(selection.features)
            elif inputs.projected is not None:
                kept_tokens = gather_tokens(inputs.projected, keep_indices)
            else:
                kept_tokens = projector(gather_tokens(features, keep_indices))  # project only the kept rows

        is_image = input_ids == self.image_token_id
        keep_placeholder = torch.zeros(num_images, num_tokens, dtype=torch.bool, device=input_ids.device)
        keep_placeholder.scatter_(1, keep_indices.to(input_ids.device), True)
        keep = ~is_image
        keep[is_image] = keep_placeholder.flatten()  # placeholders run image by image, row-major
        # Old padding goes too: rows shrink by different amounts and are re-padded to the new longest.
        keep &= attention_mask.bool()

        pruned_kwargs = {k: v for k, v in model_kwargs.items() if k not in _VISION_ONLY_KWARGS}
        batch, length = input_ids.shape
        per_token = {
            name: (value, self.pad_token_id if name == "input_ids" else _PER_TOKEN_FILL.get(name, 0))
            for name, value in model_kwargs.items()
            if name != "attention_mask" and isinstance(value, torch.Tensor) and value.shape[:2] == (batch, length)
        }
        new_mask, compacted = compact_sequences(keep, attention_mask, per_token)
        pruned_kwargs.update(compacted)
        pruned_kwargs["attention_mask"] = new_mask
        pruned_kwargs["mm_encoder_outputs"] = {
            "image": BaseModelOutputWithPooling(pooler_output=list(kept_tokens.unbind(0)))
        }
        grid = inputs.grid_shape if strategy == "default" else None
        records = [
            ImageSelection(int(row), num_tokens, keep_indices[i].cpu(), grid) for i, row in enumerate(image_rows.tolist())
        ]
        return PrunedInputs(pruned_kwargs, records, length, new_mask.shape[1])

    def _image_rows(self, input_ids: torch.Tensor, num_images: int, num_tokens: int) -> torch.Tensor:
        """Batch row of each image, from the placeholder counts. (I,) long."""
        placeholders = (input_ids == self.image_token_id).sum(dim=1)  # (B,)
        if bool((placeholders % num_tokens).any()) or int(placeholders.sum()) != num_images * num_tokens:
            raise FlashVLMError(
                f"the prompt has {placeholders.tolist()} image placeholder tokens per row, but {num_images} "
                f"image(s) of {num_tokens} tokens were given: build inputs with the model's processor"
            )
        return torch.repeat_interleave(
            torch.arange(input_ids.shape[0], device=input_ids.device), placeholders // num_tokens
        )


def _square_grid(num_tokens: int) -> tuple[int, int] | None:
    side = int(round(num_tokens**0.5))
    return (side, side) if side * side == num_tokens else None


def _pad_token_id(model) -> int:
    for config in (model.config, getattr(model.config, "text_config", None), getattr(model, "generation_config", None)):
        pad = getattr(config, "pad_token_id", None) if config is not None else None
        if isinstance(pad, int):
            return pad
    return 0
