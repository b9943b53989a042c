"""Qwen3-VL (dense and MoE) in vLLM with flashvlm: Qwen2.5-VL's path (``qwen_vl.py``) plus DeepStack.

Registered under ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration``;
without the ``flashvlm`` key in ``hf_overrides`` every override defers to vLLM's class. What
differs from Qwen2.5-VL, as in the HF adapter (``flashvlm.adapters.qwen3_vl``):

- the tower attends to the whole image in every block, in raster order: saliency comes from
  its last block;
- vLLM's tower returns each merged token with its DeepStack features beside it, (M, D * (1 +
  levels)); they are pruned with the same keep mask as the tokens (a merging method's token
  keeps those of the position it stands at), and vLLM's ``embed_input_ids`` splits them off
  and adds them after the first decoder layers as for an unpruned image;
- a video is one placeholder run per frame, between timestamps: the positions follow vLLM's
  own frame walk (``_iter_mm_grid_hw``). Videos are not pruned.
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen_vl import PrunedQwenVLInfoMixin, PrunedQwenVLMixin, PrunedQwenVLProcessorMixin


class PrunedQwen3VLMixin(PrunedQwenVLMixin):
    def merger_norm(self):
        return self.visual.merger.norm

    def embedding_width(self) -> int:
        return self.visual_dim + self.multiscale_dim

    def split_tower_output(self, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, *levels = output.split(self.visual_dim, dim=-1)  # (M, D) each
        return tokens, {f"deepstack_{level}": features for level, features in enumerate(levels)}

    def visual_runs(self, input_tokens, mm_features):
        config = self.config
        walk = dict(
            video_token_id=config.video_token_id,
            vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id,
            spatial_merge_size=config.vision_config.spatial_merge_size,
        )
        for feature in sorted(mm_features, key=lambda feature: feature.mm_position.offset):
            # An image is one run; a video, one run per frame (each (1, h, w)).
            for offset, grid_h, grid_w, length in self._iter_mm_grid_hw(input_tokens, [feature], **walk):
                if feature.modality == "image":
                    length = feature.mm_position.length  # K slots, not the unpruned h * w
                yield offset, length, feature.modality, np.indices((1, grid_h, grid_w)).reshape(3, -1)


class PrunedQwen3VLProcessingInfo(PrunedQwenVLInfoMixin, Qwen3VLProcessingInfo):
    pass


class PrunedQwen3VLMoeProcessingInfo(PrunedQwenVLInfoMixin, Qwen3VLMoeProcessingInfo):
    pass


class PrunedQwen3VLMultiModalProcessor(PrunedQwenVLProcessorMixin, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3VLMultiModalProcessor, info=PrunedQwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class PrunedQwen3VL(PrunedQwen3VLMixin, Qwen3VLForConditionalGeneration):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen3VLMultiModalProcessor, info=PrunedQwen3VLMoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class PrunedQwen3VLMoe(PrunedQwen3VLMixin, Qwen3VLMoeForConditionalGeneration):
    pass
