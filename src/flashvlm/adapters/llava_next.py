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

from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ..errors import FlashVLMError
from ..pipeline import ImageSelection, TokenRegion, VisualItem, split_stacked_channels, square_grid, stacked_channels
from .base import FamilySupport
from .llava import LlavaAdapter
from .sequence import require_argument


class LlavaNextAdapter(LlavaAdapter):
    architectures = ("LlavaNextForConditionalGeneration",)
    support = FamilySupport(
        "LLaVA-NeXT",
        saliency="CLS attention row, per view",
        budget_unit="whole image: the base view keeps round(K·N_base/N), the crops the rest; newline tokens kept "
        "outside the budget, one per row that keeps tokens",
        positions="contiguous",
    )

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

    def visual_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[VisualItem]:
        items = self.image_items(model_kwargs, needs) if model_kwargs.get("pixel_values") is not None else []
        if model_kwargs.get("pixel_values_videos") is not None:
            items += self.video_items(model_kwargs, needs)
        return items

    def image_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[VisualItem]:
        pixel_values = model_kwargs["pixel_values"]
        counts = self.patches_per_image(model_kwargs)
        if pixel_values.dim() == 5:  # (I, P_max, 3, H, W), padded with unused crops
            pixel_values = torch.cat([stack[:count] for stack, count in zip(pixel_values, counts)])
        elif pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape)
            raise FlashVLMError(f"pixel_values must be (images, views, 3, H, W) or (views, 3, H, W); got shape {shape}")
        stack = self.encode_patches(pixel_values, model_kwargs, needs)
        projected = self.project(stack.features)  # (P, n, D)
        side = stacked_channels(stack)
        marker = torch.zeros(side.shape[-1], dtype=side.dtype, device=side.device)
        marker[-1] = 1.0
        tokens = self.pack(list(projected.split(counts)), model_kwargs, self.core.image_newline)
        sides = self.pack(list(side.split(counts)), model_kwargs, marker)
        patch_tokens = stack.features.shape[1]
        items = []
        for count, image_tokens, image_side in zip(counts, tokens, sides):
            item = split_stacked_channels(image_side, stack, "image", image_tokens)
            is_newline = item.is_newline
            item.row_of = is_newline.long().cumsum(0) - is_newline.long()  # a row ends with its newline
            real = (~is_newline).nonzero().squeeze(-1)
            if count > 1:
                # The base view comes first and has no newline of its own.
                item.row_of[:patch_tokens] = -1
                crops = real[patch_tokens:]
                num_rows = int(is_newline.sum())
                regions = [
                    TokenRegion(real[:patch_tokens], square_grid(patch_tokens)),
                    TokenRegion(crops, (num_rows, crops.numel() // max(num_rows, 1))),
                ]
            else:
                regions = [TokenRegion(real, square_grid(real.numel()))]
            item.units = [ImageSelection.of("image", regions)]
            items.append(item)
        return items

    def video_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[VisualItem]:
        """LLaVA-NeXT takes no video; see the OneVision adapter."""
        return []
