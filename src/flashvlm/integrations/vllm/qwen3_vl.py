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
  own frame walk (``_iter_mm_grid_hw``). Videos are pruned per frame (K slots in each frame's
  run); ``video_budget="per_video"`` is refused, since vLLM fixes each frame's run before the
  selection decides how many tokens a frame keeps. The guiding text holds each frame's
  timestamp and markers, as in the prompt transformers expands.
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

#: Qwen3-VL lays a video out as one run per frame: its budget counts per frame only.
PER_FRAME_ONLY = ("per_frame",)


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
                yield offset, length, np.indices((1, grid_h, grid_w)).reshape(3, -1)

    def kept_offsets(self, indices: torch.Tensor, rows: int, cols: int, t_factor: float) -> torch.Tensor:
        # Each frame is a run of its own, so a kept token's offset is within its frame: t = 0.
        within = indices % (rows * cols)
        return torch.stack([torch.zeros_like(within), within // cols, within % cols], dim=1)


class PrunedQwen3VLInfoMixin(PrunedQwenVLInfoMixin):
    flashvlm_video_budgets = PER_FRAME_ONLY


class PrunedQwen3VLProcessingInfo(PrunedQwen3VLInfoMixin, Qwen3VLProcessingInfo):
    pass


class PrunedQwen3VLMoeProcessingInfo(PrunedQwen3VLInfoMixin, Qwen3VLMoeProcessingInfo):
    pass


class PrunedQwen3VLMultiModalProcessor(PrunedQwenVLProcessorMixin, Qwen3VLMultiModalProcessor):
    def flashvlm_video_placeholders(self, settings, stock, out_mm_kwargs, item_idx: int):
        # Each frame's run between its timestamp and markers keeps K placeholders.
        num_frames, per_frame = self.flashvlm_video_grid(out_mm_kwargs, item_idx)
        timestamps = out_mm_kwargs["video"][item_idx]["timestamps"].data
        return self.flashvlm_video_layout(settings.num_kept_per_frame(num_frames, per_frame), timestamps)

    def flashvlm_video_layout(self, tokens_per_frame: list[int], timestamps):
        """vLLM's own layout of a video's frames (timestamp, start marker, ``n`` placeholders,
        end marker, per frame), with ``tokens_per_frame[i]`` placeholders in frame ``i``."""
        config = self.info.get_hf_config()
        return Qwen3VLMultiModalProcessor.get_video_repl(
            tokens_per_frame=tokens_per_frame,
            timestamps=timestamps,
            tokenizer=self.info.get_tokenizer(),
            vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id,
            video_token_id=config.video_token_id,
            select_token_id=True,
        )

    def flashvlm_guiding_prompt(self, prompt: list[int], processed, mm_items) -> list[int]:
        """The prompt with each video placeholder laid out frame by frame (one placeholder per
        frame stands for its run), so the text holds the timestamps and markers transformers'
        expanded prompt holds. Needs every video of the prompt in ``processed``; where vLLM's
        processor cache held some, the prompt is taken as it came (docs/vllm.md)."""
        timestamps = processed.get("timestamps") or []
        video_token = self.info.get_hf_config().video_token_id
        if len(timestamps) != prompt.count(video_token):
            return prompt
        per_video = iter(timestamps)
        expanded = []
        for token in prompt:
            if token == video_token:
                stamps = next(per_video)
                expanded += self.flashvlm_video_layout([1] * len(stamps), stamps).full
            else:
                expanded.append(token)
        return expanded


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
