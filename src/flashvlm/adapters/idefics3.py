"""Adapter for Idefics3 and SmolVLM/SmolVLM2 (``Idefics3ForConditionalGeneration``,
``SmolVLMForConditionalGeneration``): SigLIP on split sub-images, pixel shuffle, row/column markers.

The processor splits a large image into rows x cols sub-images plus a downscaled global
view (last) and writes, per sub-image, ``<fake_token_around_image><row_i_col_j>`` then its
image tokens (``<global-img>`` for the global view). ``pixel_values`` are (B, S, 3, H, W):
each row's sub-images, padded with all-zero images that the model skips. Every sub-image
goes through the SigLIP tower; the connector pixel-shuffles it (scale 2-4) and projects.

- **Saliency.** SigLIP has no CLS token: the attention each patch *receives* in the last
  layer (the one whose output the model uses), padding patches excluded, averaged over
  each pixel-shuffle group. Keys are averaged the same way; the features a method
  compares are the shuffled features the projector consumes.
- **Budget.** Per image, across its sub-images: a split image keeps
  ``round(K * N_tiles / N)`` tokens among all its tiles, chosen jointly (their layout is
  not in the model's inputs), and the global view keeps the rest; a method that needs the
  token grid (pool) gets each tile as its own square raster with its share, as for
  InternVL. With ``tile_budget="per_tile"`` every sub-image and the global view keep their
  own share, each selected alone (as the vLLM plug-in serves these models: each sub-image is a
  placeholder run of its own there). The marker tokens are text: they are always kept,
  outside the budget. Which
  sub-images form one image is read from the prompt: an image ends with the run after
  ``<global-img>``, the marker before the last run of every row.
- **Video** (SmolVLM2): the processor sends each frame as an unsplit image, so each frame
  gets the budget; ``video_budget="per_video"`` is refused (frames are not told apart
  from images in the model's inputs).

Positions stay ordinary 1-D positions over the shortened prompt.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import FlashVLMError
from ..pipeline import VisualItem
from ..saliency import received_attention
from .base import FamilySupport, ModelAdapter
from .sequence import placeholder_runs
from .shared import image_of_views, needs_query_key, refuse_per_video
from .taps import capture, tap_vision_layer

#: Whether the model's forward takes each image's tokens as a list (transformers 5.20 on).
TAKES_LISTS = tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (5, 20)


class Idefics3Adapter(ModelAdapter):
    architectures = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    support = FamilySupport(
        "Idefics3 / SmolVLM",
        saliency="attention received in the last SigLIP layer (padding patches excluded), averaged over each "
        "pixel-shuffle group",
        budget_unit="whole image across its sub-images, as InternVL (tiles jointly, then the global view; each "
        "tile its own raster for pool); row/column marker tokens kept outside the budget; video frames arrive as "
        "images, so per frame",
        positions="contiguous",
        lacks=frozenset({"cls_attention"}),
    )
    vision_only_kwargs = ("pixel_values", "pixel_attention_mask")
    saliency_kind = "received"

    def __init__(self, model, **settings) -> None:
        super().__init__(model, **settings)
        refuse_per_video(model, self.video_budget)
        self.saliency_layer = self.core.vision_model.encoder.layers[-1]
        self.key_heads = self.saliency_layer.self_attn.num_heads
        self.scale_factor = self.core.connector.scale_factor

    @property
    def language_model(self) -> torch.nn.Module:
        return self.core.text_model

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.core.vision_model

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.core.connector.modality_projection(features)

    def group_mean(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(R, n, X) -> (R, m, X): the mean over each pixel-shuffle group (each X-wide block is one patch)."""
        shuffled = self.core.connector.pixel_shuffle(per_patch, self.scale_factor)  # (R, m, s*s*X)
        return shuffled.view(*shuffled.shape[:2], -1, per_patch.shape[-1]).mean(dim=2)

    def encode_sub_images(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> VisualItem:
        """The model's own image encoding of every real sub-image, row-major: features
        (R, m, s*s*C), tokens (R, m, D), and saliency (R, m) and keys (R, m, C) if asked."""
        need_qk = needs_query_key(needs)
        # The tower is called with the patch mask the model derives from pixel_attention_mask.
        with (
            capture(keyword_inputs_of=self.core.vision_model) as captured,
            tap_vision_layer(self.saliency_layer, capture_qk=need_qk, stop_after=False) as tap,
        ):
            output = self.core.get_image_features(
                model_kwargs["pixel_values"], model_kwargs.get("pixel_attention_mask"), return_dict=True
            )
        features = self.core.connector.pixel_shuffle(output.last_hidden_state, self.scale_factor)
        pooled = output.pooler_output  # per sub-image tensors (transformers 5.2x), or one tensor (earlier 5.x)
        tokens = (torch.cat(pooled) if isinstance(pooled, (list, tuple)) else pooled).view(*features.shape[:2], -1)
        stack = VisualItem("image", features, tokens)
        if need_qk:
            patch_mask = captured["patch_attention_mask"].flatten(1)  # (R, n) real patches
            attention = self.saliency_layer.self_attn
            saliency = received_attention(tap.queries, tap.keys, self.key_heads, attention.scale, key_mask=patch_mask)
            stack.saliency = self.group_mean(saliency[..., None]).squeeze(-1)
            if "keys" in needs:
                stack.keys = self.group_mean(tap.keys)
        return stack

    def encoder_output(self, kind: str, items: list[VisualItem]) -> BaseModelOutputWithPooling:
        output = super().encoder_output(kind, items)
        if not TAKES_LISTS:
            # Before transformers 5.20 Idefics3 scatters one tensor of every kept token, image
            # after image. (SmolVLM's merger there needs whole sub-images: it cannot be pruned.)
            output.pooler_output = torch.cat(output.pooler_output)
        return output

    def visual_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[VisualItem]:
        stack = self.encode_sub_images(model_kwargs, needs)
        num_sub_images, per_sub_image = stack.features.shape[:2]
        input_ids = model_kwargs["input_ids"]
        runs = placeholder_runs(input_ids, self.token_ids["image"])[2].tolist()
        if len(runs) != num_sub_images or any(length != per_sub_image for length in runs):
            raise FlashVLMError(
                f"the prompt's image placeholder runs {runs} do not match the {num_sub_images} sub-images of "
                f"{per_sub_image} tokens in pixel_values: build inputs with the model's processor"
            )
        ends_image = global_view_runs(input_ids, self.token_ids["image"])
        items, first = [], 0
        for last in [place for place, is_global in enumerate(ends_image) if is_global]:
            items.append(
                image_of_views(
                    stack, first, last + 1 - first, tile_grids="grid" in needs or self.tile_budget == "per_tile"
                )
            )
            first = last + 1
        return items


def global_view_runs(input_ids: torch.Tensor, token_id: int) -> list[bool]:
    """For each run of ``token_id`` (row-major), whether it is an image's global view.

    The processor ends every image with its global view, so the token before the last run
    of any row is the global-view marker; a run preceded by that marker ends an image.
    """
    rows, starts, _ = placeholder_runs(input_ids, token_id)
    markers = input_ids[rows, (starts - 1).clamp(min=0)]
    last_of_row = torch.ones_like(rows, dtype=torch.bool)
    last_of_row[:-1] = rows[1:] != rows[:-1]
    global_marker = markers[last_of_row]
    if global_marker.numel() and not bool((global_marker == global_marker[0]).all()):
        raise FlashVLMError(
            f"the prompt's images do not all end with the same marker token (found {global_marker.tolist()}): "
            "build inputs with the model's processor"
        )
    return (markers == global_marker[0]).tolist() if global_marker.numel() else []
