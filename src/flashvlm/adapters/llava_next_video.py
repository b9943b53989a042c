"""Adapter for LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): AnyRes images and videos.

Images are exactly LLaVA-NeXT's (CLS saliency per view, base/crops budget split, newline
rule; see :mod:`.llava_next`).

Videos: every frame goes through the CLIP tower; the model's ``vision_resampler`` pools
each frame's patch raster (2 x 2 average by default) and the projector maps the pooled
features to language-model tokens; no newline tokens. We select among the pooled tokens
the model would send: the features a method compares are the resampler's output, and
CLS saliency and keys are averaged over the same pooling windows (for the ``max`` and
``conv`` pooling modes too, where the features themselves are pooled the model's way).
The budget counts per frame (``video_budget="per_frame"``, default) or per video with all
frames selected jointly (``"per_video"``); videos of one batch may keep different counts.

Positions stay ordinary 1-D positions over the shortened prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from ..pipeline import VisualItem, average_pool_windows, square_grid
from .base import FamilySupport
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .shared import needs_projected


class LlavaNextVideoAdapter(LlavaNextAdapter):
    architectures = ("LlavaNextVideoForConditionalGeneration",)
    support = FamilySupport(
        "LLaVA-NeXT-Video",
        saliency="CLS attention row, per view; for video averaged over the resampler's pooling windows",
        budget_unit="image (as LLaVA-NeXT), or video frame / whole video",
        positions="contiguous",
    )
    pixel_arguments = ("pixel_values", "pixel_values_videos")
    vision_only_kwargs = LlavaAdapter.vision_only_kwargs + ("pixel_values_videos",)

    def pool_like_resampler(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(P, n, X) patch values -> (P, m, X), averaged over the resampler's pooling windows."""
        return average_pool_windows(per_patch, self.model.config.spatial_pool_stride)

    def video_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[VisualItem]:
        videos = model_kwargs["pixel_values_videos"]  # (V, F, 3, H, W)
        num_videos, num_frames = videos.shape[:2]
        stack = self.encode_patches(videos.flatten(0, 1), model_kwargs, needs)
        stack.features = self.core.vision_resampler(stack.features)  # (V*F, m, C)
        if stack.saliency is not None:
            stack.saliency = self.pool_like_resampler(stack.saliency[..., None].float()).squeeze(-1)
        if stack.keys is not None:
            stack.keys = self.pool_like_resampler(stack.keys)
        if needs_projected(needs):
            stack.tokens = self.project(stack.features)  # (V*F, m, D)
        per_frame = stack.features.shape[1]
        grid = square_grid(per_frame)
        items = []
        for video in range(num_videos):
            frames = slice(video * num_frames, (video + 1) * num_frames)
            item = stack.map(lambda tensor, frames=frames: tensor[frames].flatten(0, 1))
            item.kind = "video"
            item.units = self.video_units(num_frames, per_frame, grid, stack.features.device)
            items.append(item)
        return items
