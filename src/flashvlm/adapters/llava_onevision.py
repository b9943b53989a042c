"""Adapter for LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): images and videos.

SigLIP has no CLS token, so saliency is the attention each patch *receives* in the
feature layer, computed from that layer's queries and keys in chunks (O(N * chunk)
memory) while the tower itself keeps SDPA/FlashAttention.

Images are AnyRes as in LLaVA-NeXT (same budget split and newline rule; see
:mod:`.llava_next`), except that the model may shrink a large crop raster by bilinear
interpolation ("anyres_max_9") after projecting it: we select among the tokens the
model would really send, with saliency, features and keys interpolated the same way.
Several images in one prompt get the base view only, as the model does.

Videos: each frame is encoded, projected and 2x2 bilinear-pooled by the model's own
``apply_pooling``; saliency and features are pooled alike. The budget counts per frame
(``video_budget="per_frame"``, default) or per video with all frames selected jointly
(``"per_video"``). The single newline token that ends each video is always kept,
outside the budget.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import FlashVLMError
from ..pipeline import VisualItem, split_stacked_channels, stacked_channels
from .base import FamilySupport
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    support = FamilySupport(
        "LLaVA-OneVision",
        saliency="attention received (SigLIP has no CLS), in chunks",
        budget_unit="image (as LLaVA-NeXT), or video frame / whole video",
        positions="contiguous",
        lacks=frozenset({"cls_attention"}),
    )
    pixel_arguments = ("pixel_values", "pixel_values_videos")
    vision_only_kwargs = LlavaAdapter.vision_only_kwargs + (
        "pixel_values_videos",
        "image_sizes_videos",
        "vision_aspect_ratio",
        "batch_num_images",
    )

    def patches_per_image(self, model_kwargs: dict[str, Any]) -> list[int]:
        # A prompt with several images sends each as its base view only (the model's rule).
        counts = super().patches_per_image(model_kwargs)
        per_prompt = model_kwargs.get("batch_num_images")
        if per_prompt is None:
            return counts
        single = [int(n) == 1 for n in per_prompt for _ in range(int(n))]
        return [count if alone else 1 for count, alone in zip(counts, single)]

    def pack(self, per_image: list[torch.Tensor], model_kwargs: dict[str, Any], newline: torch.Tensor):
        aspect_ratio = model_kwargs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        packed, _ = self.core.pack_image_features(
            per_image, model_kwargs["image_sizes"], image_newline=newline, vision_aspect_ratio=aspect_ratio
        )
        return packed

    def video_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[VisualItem]:
        videos = model_kwargs["pixel_values_videos"]  # (V, F, 3, H, W)
        num_videos, num_frames = videos.shape[:2]
        stack = self.encode_patches(videos.flatten(0, 1), model_kwargs, needs)
        tokens = self.core.apply_pooling(self.project(stack.features))  # (V*F, m, D)
        side = self.core.apply_pooling(stacked_channels(stack))  # (V*F, m, X)
        per_frame = tokens.shape[1]
        height = width = int(round(per_frame**0.5))
        grid = (height, width) if height * width == per_frame else None
        items = []
        for video in range(num_videos):
            frames = slice(video * num_frames, (video + 1) * num_frames)
            video_tokens = torch.cat([tokens[frames].flatten(0, 1), self.core.image_newline[None].to(tokens)])
            video_side = side[frames].flatten(0, 1)
            marker = torch.zeros_like(video_side[:1])
            marker[0, -1] = 1.0
            item = split_stacked_channels(torch.cat([video_side, marker]), stack, "video", video_tokens)
            # One "row" (every frame token) ends with the video's newline.
            item.row_of = torch.zeros_like(item.is_newline, dtype=torch.long)
            item.units = self.video_units(num_frames, per_frame, grid, tokens.device)
            items.append(item)
        return items

    def encoder_output(self, kind: str, items: list[VisualItem]):
        output = super().encoder_output(kind, items)
        if kind == "image":
            return output
        # The model flattens a (V, L, D) tensor of videos, so every video must keep as many tokens.
        lengths = sorted({item.sent.shape[0] for item in items})
        if len(lengths) != 1:
            raise FlashVLMError(f"every video in a batch must keep the same number of tokens; got {lengths}")
        output.pooler_output = torch.stack(output.pooler_output)
        return output
