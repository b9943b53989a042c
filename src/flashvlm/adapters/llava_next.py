"""Adapter for LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes images.

An AnyRes image reaches the language model as the base (low-resolution) view, then the
high-resolution crops stitched into one raster with padding removed, with an
``image_newline`` token after every raster row. We let the model arrange its own tokens
(``pack_image_features``, applied to the projected tokens and, separately, to the vision
features, saliency and keys), so the layout is always the model's own, and select among
the real patch tokens only:

- **Budget split.** The budget counts real patch tokens of the whole image (base +
  crops; newlines excluded). ``K`` is shared in proportion to the tokens each view has:
  the base keeps ``round(K * N_base / N)`` and the crops keep the rest, each chosen by
  the method among its own tokens (so the global view is never lost to the crops, and
  a ratio budget keeps the same share of both).
- **Newlines.** A row's newline token is kept, outside the budget, when the row keeps at
  least one token, so the language model still sees where each kept row ends; rows that
  lose every token lose their newline too. An image therefore reaches the language
  model as ``K`` patch tokens plus one newline per non-empty crop row (plus the single
  trailing newline of a base-only image).
- **FastV.** The scoring pass (``lm_attention``) runs on the unpruned prompt with every
  token, newlines included, where the model puts it; each unit ranks its own patch tokens.

Positions stay ordinary 1-D positions over the shortened prompt, as for LLaVA-1.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ..errors import FlashVLMError
from ..selection import Budget, TokenSelector, resolve_budget
from .base import (
    ImageSelection,
    PrunedInputs,
    UnitChoice,
    VisualUnit,
    placeholder_rows,
    prompt_tensors,
    prompt_text,
    rebuild_model_kwargs,
    require_argument,
    select_units,
)
from .llava import EncodedPatches, LlavaAdapter, square_grid


@dataclass
class PackedItem:
    """One image or video as the language model receives it, newline tokens included."""

    kind: str  # "image" or "video"
    tokens: torch.Tensor  # (L, D) projected tokens in the model's order
    features: torch.Tensor  # (L, C) vision features at the same places (zeros at newlines)
    saliency: torch.Tensor | None  # (L,) float32
    keys: torch.Tensor | None  # (L, C_k)
    is_newline: torch.Tensor  # (L,) bool
    row_of: torch.Tensor  # (L,) long: raster row a token ends with a newline; -1 for rows without one
    #: Budget units: (positions (N_u,) long, grid) each; an image's units share its budget.
    regions: list[tuple[torch.Tensor, tuple[int, int] | None]] = field(default_factory=list)
    batch_index: int = 0
    lm_attention: torch.Tensor | None = None  # (L,) float32, the last prompt token's attention in the LM


class LlavaNextAdapter(LlavaAdapter):
    architectures = ("LlavaNextForConditionalGeneration",)
    video_token_id: int | None = None  # LLaVA-NeXT takes images only

    # -- the model's own layout ------------------------------------------------------------------
    def patches_per_image(self, model_kwargs: dict[str, Any]) -> list[int]:
        """Tower inputs (base + crops) of each image, as the model counts them."""
        config = self.model.config
        return [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in require_argument(model_kwargs, "image_sizes", "pixel_values")
        ]

    def pack(self, per_image: list[torch.Tensor], model_kwargs: dict[str, Any], newline: torch.Tensor):
        """The model's ``pack_image_features`` on (P_i, n, X) tensors with a (X,) newline row."""
        strategy = self._feature_settings(model_kwargs)[1]
        packed, _ = self.core.pack_image_features(
            per_image, model_kwargs["image_sizes"], vision_feature_select_strategy=strategy, image_newline=newline
        )
        return packed

    @staticmethod
    def side_channels(encoded: EncodedPatches) -> torch.Tensor:
        """Features, saliency and keys (those present) side by side, float32, plus a 0
        "is newline" channel: (P, n, X), so the model's packing moves them together."""
        parts = [encoded.features.float()]
        if encoded.saliency is not None:
            parts.append(encoded.saliency[..., None])
        if encoded.keys is not None:
            parts.append(encoded.keys.float())
        parts.append(torch.zeros_like(parts[0][..., :1]))
        return torch.cat(parts, dim=-1)

    @staticmethod
    def split_side_channels(packed: torch.Tensor, encoded: EncodedPatches, dtype: torch.dtype):
        """Inverse of :meth:`side_channels` on packed rows (L, X): features, saliency, keys, is_newline."""
        width = encoded.features.shape[-1]
        features, rest = packed[:, :width].to(dtype), packed[:, width:-1]
        saliency = keys = None
        if encoded.saliency is not None:
            saliency, rest = rest[:, 0], rest[:, 1:]
        if encoded.keys is not None:
            keys = rest.to(dtype)
        return features, saliency, keys, packed[:, -1] > 0.5

    def image_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[PackedItem]:
        pixel_values = model_kwargs["pixel_values"]
        counts = self.patches_per_image(model_kwargs)
        if pixel_values.dim() == 5:  # (I, P_max, 3, H, W), padded with unused crops
            pixel_values = torch.cat([stack[:count] for stack, count in zip(pixel_values, counts)])
        elif pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape)
            raise FlashVLMError(f"pixel_values must be (images, views, 3, H, W) or (views, 3, H, W); got shape {shape}")
        encoded = self.encode_patches(pixel_values, model_kwargs, needs)
        projected = self.core.multi_modal_projector(encoded.features)  # (P, n, D)
        side = self.side_channels(encoded)
        marker = torch.zeros(side.shape[-1], dtype=side.dtype, device=side.device)
        marker[-1] = 1.0
        tokens = self.pack(list(projected.split(counts)), model_kwargs, self.core.image_newline)
        sides = self.pack(list(side.split(counts)), model_kwargs, marker)
        patch_tokens = encoded.features.shape[1]
        items = []
        for count, image_tokens, image_side in zip(counts, tokens, sides):
            features, saliency, keys, is_newline = self.split_side_channels(image_side, encoded, projected.dtype)
            newlines_before = is_newline.long().cumsum(0) - is_newline.long()
            real = (~is_newline).nonzero().squeeze(-1)
            item = PackedItem("image", image_tokens, features, saliency, keys, is_newline, newlines_before)
            if count > 1:
                # The base view comes first and has no newline of its own.
                item.row_of[:patch_tokens] = -1
                crops = real[patch_tokens:]
                num_rows = int(is_newline.sum())
                item.regions = [
                    (real[:patch_tokens], square_grid(patch_tokens)),
                    (crops, (num_rows, crops.numel() // max(num_rows, 1))),
                ]
            else:
                item.regions = [(real, square_grid(real.numel()))]
            items.append(item)
        return items

    def video_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[PackedItem]:
        """LLaVA-NeXT takes no video; see the OneVision adapter."""
        return []

    # -- selection -----------------------------------------------------------------------------
    def item_units(self, item: PackedItem, budget: Budget) -> list[tuple[VisualUnit, str]]:
        """Budget units of an item, each with the kind of record it reports as."""

        def unit(positions: torch.Tensor, unit_budget: Budget, grid) -> VisualUnit:
            return VisualUnit(
                item.batch_index,
                unit_budget,
                item.features[positions],
                item.tokens[positions],
                None if item.saliency is None else item.saliency[positions],
                None if item.keys is None else item.keys[positions],
                grid,
                None if item.lm_attention is None else item.lm_attention[positions],
            )

        if item.kind == "video":
            kind = "frame" if self.video_budget == "per_frame" else "video"
            return [(unit(positions, budget, grid), kind) for positions, grid in item.regions]
        total = sum(positions.numel() for positions, _ in item.regions)
        num_keep = resolve_budget(budget, total)
        shares, assigned = [], 0
        for place, (positions, _) in enumerate(item.regions):
            last = place == len(item.regions) - 1
            share = num_keep - assigned if last else round(num_keep * positions.numel() / total)
            shares.append(share)
            assigned += share
        return [(unit(positions, share, grid), "image") for (positions, grid), share in zip(item.regions, shares)]

    def prune_inputs(self, model_kwargs: dict[str, Any], selector: TokenSelector, budget: Budget) -> PrunedInputs:
        input_ids, attention_mask = prompt_tensors(model_kwargs)
        needs = selector.requires
        token_ids = {"image": self.image_token_id, "video": self.video_token_id}
        placeholders = [token for token in token_ids.values() if token is not None]
        keep = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(placeholders, device=input_ids.device))
        outputs: dict[str, BaseModelOutputWithPooling] = {}
        records: list[ImageSelection] = []

        # In training, gradients reach the tower and projector through the kept tokens.
        with torch.set_grad_enabled(self.model.training and torch.is_grad_enabled()):
            text = prompt_text(self.model, input_ids, attention_mask, placeholders, needs)
            items = []
            if model_kwargs.get("pixel_values") is not None:
                items += self.image_items(model_kwargs, needs)
            if model_kwargs.get("pixel_values_videos") is not None:
                items += self.video_items(model_kwargs, needs)
            by_kind = {kind: [item for item in items if item.kind == kind] for kind in token_ids}
            by_kind = {kind: kind_items for kind, kind_items in by_kind.items() if kind_items}
            for kind, kind_items in by_kind.items():
                lengths = [item.tokens.shape[0] for item in kind_items]
                for item, row in zip(kind_items, placeholder_rows(input_ids, token_ids[kind], lengths, kind)):
                    item.batch_index = row
            if "lm_attention" in needs:
                # The scoring pass sees every token where the model puts it, newlines included;
                # each unit then reads the scores of its own selectable tokens.
                sent = {
                    token_ids[kind]: torch.cat([item.tokens for item in kind_items])
                    for kind, kind_items in by_kind.items()
                }
                scores = self.visual_token_attention(input_ids, attention_mask, sent, selector.lm_attention_layer)
                for kind, kind_items in by_kind.items():
                    lengths = [item.tokens.shape[0] for item in kind_items]
                    for item, item_scores in zip(kind_items, scores[token_ids[kind]].split(lengths)):
                        item.lm_attention = item_scores
            per_item = [self.item_units(item, budget) for item in items]
            units = [unit for item_units in per_item for unit, _ in item_units]
            choices = iter(select_units(units, selector, self.saliency_kind, *text, key_heads=self.key_heads))

            kept = {"image": [], "video": []}
            keep_masks = {"image": [], "video": []}
            for item, item_units in zip(items, per_item):
                item_choices = [next(choices) for _ in item_units]
                tokens, is_kept = self.apply_choices(item, item_units, item_choices, records)
                kept[item.kind].append(tokens)
                keep_masks[item.kind].append(is_kept.to(input_ids.device))

        for kind, kind_tokens in kept.items():
            if not kind_tokens:
                continue
            keep[input_ids == token_ids[kind]] = torch.cat(keep_masks[kind])
            outputs[kind] = BaseModelOutputWithPooling(pooler_output=self.encoder_output(kind, kind_tokens))
        pruned_kwargs, new_mask = rebuild_model_kwargs(
            model_kwargs, keep, self.vision_only_kwargs, self.pad_token_id, outputs
        )
        return PrunedInputs(pruned_kwargs, records, input_ids.shape[1], new_mask.shape[1])

    def apply_choices(
        self,
        item: PackedItem,
        item_units: list[tuple[VisualUnit, str]],
        choices: list[UnitChoice],
        records: list[ImageSelection],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens an item sends (K', D) and its keep mask (L,); appends its records."""
        tokens = item.tokens.clone()
        is_kept = torch.zeros_like(item.is_newline)
        kept_of_image: list[torch.Tensor] = []
        offset = 0
        for (unit, record_kind), (positions, grid), choice in zip(item_units, item.regions, choices):
            chosen = positions[choice.indices.to(positions.device)]
            is_kept[chosen] = True
            if choice.features is not None:
                tokens[chosen] = self.core.multi_modal_projector(choice.features).to(tokens.dtype)
            if record_kind == "image":  # an image's views share one budget: one record
                kept_of_image.append(choice.indices.cpu() + offset)
                offset += unit.num_tokens
            else:
                record = ImageSelection(item.batch_index, unit.num_tokens, choice.indices.cpu(), grid, record_kind)
                records.append(record)
        if kept_of_image:
            grid = item.regions[0][1] if len(item.regions) == 1 else None
            records.append(ImageSelection(item.batch_index, offset, torch.cat(kept_of_image), grid, "image"))
        # A row's newline stays when the row keeps a token (see the module docstring).
        rows_kept = item.row_of[is_kept & ~item.is_newline]
        is_kept |= item.is_newline & torch.isin(item.row_of, rows_kept)
        return tokens[is_kept], is_kept

    def encoder_output(self, kind: str, kept_tokens: list[torch.Tensor]):
        """What the model's forward takes as ``pooler_output``: a list of (K_i, D) per image."""
        return kept_tokens
