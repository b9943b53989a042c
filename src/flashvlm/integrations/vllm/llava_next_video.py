"""LLaVA-NeXT-Video in vLLM with flashvlm: videos through a CLIP tower and the model's pooling
resampler, contiguous positions.

Registered under vLLM's own architecture name, ``LlavaNextVideoForConditionalGeneration``;
without the ``flashvlm`` key in ``hf_overrides`` every override below defers to vLLM's class.
vLLM's class takes videos only (its ``get_supported_mm_limits`` is ``{"video": 1}``).

As the HF adapter (``flashvlm.adapters.llava_next_video``) has it: every frame goes through
the tower with a q/k tap on the feature layer (CLS attention row as saliency, and keys); the
model's own ``vision_resampler`` pools each frame's features (2 x 2 by default), saliency and
keys are averaged over the same windows, and the projector maps the pooled features. The
budget counts per frame (``video_budget="per_frame"``: K slots per frame) or for the whole
video (``"per_video"``: K in all, its frames selected jointly). No newline tokens.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava_next_video import (
    LlavaNextVideoDummyInputsBuilder,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoMultiModalProcessor,
    LlavaNextVideoProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...pipeline import ImageSelection, TokenRegion, VisualItem, average_pool_windows
from .llava import LlavaTowerMixin
from .processing import PrunedInfoMixin, PrunedProcessorMixin
from .pruned_model import require_pixels
from .vision_cache import EncodedImage


class PrunedLlavaNextVideoProcessingInfo(PrunedInfoMixin, LlavaNextVideoProcessingInfo):
    pass


class PrunedLlavaNextVideoMultiModalProcessor(PrunedProcessorMixin, LlavaNextVideoMultiModalProcessor):
    flashvlm_modalities = ("video",)

    def flashvlm_placeholder_ids(self) -> frozenset[int]:
        return frozenset({self.info.get_hf_config().video_token_index})

    def flashvlm_video_placeholders(self, settings, stock, out_mm_kwargs, item_idx: int):
        # Stock: each frame's pooled tokens, frame after frame.
        num_frames = len(out_mm_kwargs["video"][item_idx]["pixel_values_videos"].data)
        return stock[: settings.num_kept_in_video(num_frames, len(stock) // num_frames)]


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaNextVideoMultiModalProcessor,
    info=PrunedLlavaNextVideoProcessingInfo,
    dummy_inputs=LlavaNextVideoDummyInputsBuilder,
)
class PrunedLlavaNextVideo(LlavaTowerMixin, LlavaNextVideoForConditionalGeneration):
    def embed_multimodal(self, **kwargs: object):
        if self.flashvlm is None:
            return super().embed_multimodal(**kwargs)
        video_input = self._parse_and_validate_video_input(**kwargs)
        if video_input is None:
            return []
        require_pixels(video_input)
        videos = list(video_input["pixel_values_videos"])  # (F, 3, H, W) each
        return self.keep_video_tokens(videos, kwargs, self.encode_videos, self.multi_modal_projector)

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # As vLLM's _video_pixels_to_features runs the tower, before its resampler.
        return self.vision_tower(pixel_values, feature_select_strategy=self.config.vision_feature_select_strategy)

    def encode_videos(self, videos: list[torch.Tensor], requirements: set[frozenset[str]]) -> list[EncodedImage]:
        """Each video before selection, from its (F, 3, H, W) frames, for methods of these
        ``requirements``: one tower pass over every frame, vLLM's own resampler on the features,
        and saliency and keys averaged over the resampler's windows."""
        tower = self.encode_with_saliency(torch.cat(videos), requirements)  # (ΣF, n, ...)
        stride = self.config.spatial_pool_stride
        features = self.vision_resampler(tower.features)  # (ΣF, m, C)
        saliency = None
        if tower.saliency is not None:
            saliency = average_pool_windows(tower.saliency[..., None].float(), stride).squeeze(-1)  # (ΣF, m)
        keys = None if tower.keys is None else average_pool_windows(tower.keys, stride)  # (ΣF, m, C_k)
        projected = None
        if any("projected" in need for need in requirements):
            projected = self.multi_modal_projector(features)  # (ΣF, m, D)
        encoded, first = [], 0
        for video in videos:
            frames = slice(first, first + len(video))
            first = frames.stop

            def frame_tokens(tensor: torch.Tensor | None, frames=frames) -> torch.Tensor | None:
                return None if tensor is None else tensor[frames].flatten(0, 1)

            item = VisualItem(
                "video",
                frame_tokens(features),
                tokens=frame_tokens(projected),
                saliency=frame_tokens(saliency),
                keys=frame_tokens(keys),
                # Replaced per request by its video budget's units (keep_video_tokens).
                units=[
                    ImageSelection.of(
                        "video", [TokenRegion(torch.arange(len(video) * features.shape[1], device=features.device))]
                    )
                ],
            )
            encoded.append(EncodedImage(item, tower.saliency_kind, tower.key_heads))
        return encoded
