"""Adapter for HF-native InternVL3/3.5 (``InternVLForConditionalGeneration``): dynamic tiles, pixel shuffle.

The processor cuts an image into up to 12 tiles plus a thumbnail (last), and sends every
tile through InternViT; the model pixel-shuffles each tile's patch raster 2 x 2 into one
language-model token per group (channels side by side) and projects. An image reaches the
language model as ``<img>``, ``tiles x 256`` context tokens, ``</img>``; ``pixel_values``
hold all tiles of all images without saying which image a tile belongs to, so the tiles
of an image are counted from its run of context tokens.

- **Saliency.** InternViT has a CLS token: the CLS attention row of the feature layer,
  from that layer's queries and keys after their (optional) q/k norm, averaged over each
  pixel-shuffle group, so there is one score per language-model token. Keys are averaged
  the same way; the features a method compares are the shuffled features the projector
  consumes.
- **Budget.** Per image, across its tiles: an image of several tiles keeps
  ``round(K * N_tiles / N)`` tokens among all its tiles, chosen jointly (the tiles' layout
  is not in the model's inputs, so together they form no known grid), and the thumbnail,
  the global view, keeps the rest. A method that needs the token grid (pool) gets each
  tile as its own 16 x 16 raster instead, keeping ``round(K * N_tile / N)`` of it (the
  thumbnail the rest); so does ``tile_budget="per_tile"``, for any method. A one-tile image
  is one 16 x 16 raster.
- **Video.** The processor sends each frame as a one-tile image (``Frame1: <img>...``), so
  each frame gets the budget; ``video_budget="per_video"`` is refused (frames are not told
  apart from images in the model's inputs).

Positions stay ordinary 1-D positions over the shortened prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import FlashVLMError, UnsupportedModelError
from ..pipeline import VisualItem
from ..saliency import query_row_attention
from .base import FamilySupport, ModelAdapter
from .sequence import placeholder_runs
from .shared import image_of_views, needs_projected, needs_query_key, refuse_per_video
from .taps import capture, resolve_hidden_state_layer, run_until_tap, tap_vision_layer


class InternVLAdapter(ModelAdapter):
    architectures = ("InternVLForConditionalGeneration",)
    support = FamilySupport(
        "InternVL3/3.5, HF-native",
        saliency="CLS attention row of the feature layer, averaged over each 2×2 pixel-shuffle group",
        budget_unit="whole image across its tiles: the tiles keep round(K·N_tiles/N) jointly (their layout is not "
        "in the inputs), the thumbnail the rest; for a method that needs the grid (pool), each tile is its own "
        "square raster keeping round(K·N_tile/N); video frames arrive as one-tile images, so per frame",
        positions="contiguous",
    )
    vision_only_kwargs = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
    saliency_kind = "cls"

    def __init__(self, model, **settings) -> None:
        super().__init__(model, **settings)
        refuse_per_video(model, self.video_budget)
        self.vision_layers = self.core.vision_tower.encoder.layer
        self.key_heads = self.vision_layers[0].attention.num_heads
        self.scale_factor = model.config.downsample_ratio

    def feature_settings(self, model_kwargs: dict[str, Any]) -> tuple[int, str]:
        config = self.model.config
        layer = model_kwargs.get("vision_feature_layer")
        layer = config.vision_feature_layer if layer is None else layer
        strategy = model_kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if not isinstance(layer, int) or strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_layer={layer!r}, vision_feature_select_strategy={strategy!r}: flashvlm supports "
                "one feature layer (an int) with the CLS token dropped ('default'), as InternVL3/3.5 use"
            )
        return layer, strategy

    def shuffle(self, per_patch: torch.Tensor) -> torch.Tensor:
        """The model's pixel shuffle on (P, n, X) patch values -> (P, m, g*X), one row per LM token."""
        tiles, num_patches, width = per_patch.shape
        side = int(round(num_patches**0.5))
        shuffled = self.core.pixel_shuffle(per_patch.reshape(tiles, side, side, width), self.scale_factor)
        return shuffled.reshape(tiles, -1, shuffled.shape[-1])

    def group_mean(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(P, n, X) -> (P, m, X): the mean over each pixel-shuffle group (each X-wide block is one patch)."""
        shuffled = self.shuffle(per_patch)
        return shuffled.view(*shuffled.shape[:2], -1, per_patch.shape[-1]).mean(dim=2)

    def encode_tiles(self, pixel_values: torch.Tensor, model_kwargs: dict[str, Any], needs: frozenset[str]):
        """A :class:`VisualItem` over a stack of tiles (P, 3, H, W): shuffled features (P, m, g*C),
        and saliency (P, m) and keys (P, m, C) where ``needs`` asks for them."""
        feature_layer, _ = self.feature_settings(model_kwargs)
        layer_index = resolve_hidden_state_layer(feature_layer, len(self.vision_layers))
        attention = self.vision_layers[layer_index].attention
        need_qk = needs_query_key(needs)
        # The q/k norms' outputs are the vectors the layer attends with.
        norms = {"q_norm": attention.q_norm, "k_norm": attention.k_norm} if need_qk else {}
        tower = self.core.vision_tower
        with (
            capture(norms) as captured,
            tap_vision_layer(self.vision_layers[layer_index], capture_qk=False, stop_after=True) as tap,
        ):
            run_until_tap(tower, pixel_values.to(tower.dtype))
        hidden = tap.output  # (P, 1 + n, C)
        if feature_layer == -1:  # the model reads the tower's last_hidden_state, after its final norm
            hidden = tower.layernorm(hidden)
        stack = VisualItem("image", self.shuffle(hidden[:, 1:]))
        if need_qk:
            cls_row = query_row_attention(captured["q_norm"], captured["k_norm"], self.key_heads, 0, attention.scale)
            stack.saliency = self.group_mean(cls_row[:, 1:, None]).squeeze(-1)
            if "keys" in needs:
                stack.keys = self.group_mean(captured["k_norm"][:, 1:])
        return stack

    def visual_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[VisualItem]:
        stack = self.encode_tiles(model_kwargs["pixel_values"], model_kwargs, needs)
        if needs_projected(needs):
            stack.tokens = self.project(stack.features)  # (P, m, D)
        num_tiles, per_tile = stack.features.shape[:2]
        input_ids = model_kwargs["input_ids"]
        runs = placeholder_runs(input_ids, self.token_ids["image"])[2].tolist()
        tiles_per_image = [length // per_tile for length in runs]
        if any(length % per_tile for length in runs) or sum(tiles_per_image) != num_tiles:
            raise FlashVLMError(
                f"the prompt's image placeholder runs {runs} do not make whole tiles of {per_tile} tokens "
                f"for the {num_tiles} tiles in pixel_values: build inputs with the model's processor"
            )
        items, first = [], 0
        for tiles in tiles_per_image:
            items.append(
                image_of_views(stack, first, tiles, tile_grids="grid" in needs or self.tile_budget == "per_tile")
            )
            first += tiles
        return items

    def encoder_output(self, kind: str, items: list[VisualItem]) -> BaseModelOutputWithPooling:
        # The model scatters one tensor into the placeholders: every kept token, image after image.
        return BaseModelOutputWithPooling(pooler_output=torch.cat([item.sent for item in items])[None])
