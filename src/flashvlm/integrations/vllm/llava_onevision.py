"""LLaVA-OneVision in vLLM with flashvlm: AnyRes images as LLaVA-NeXT's, SigLIP tower, and
crop rasters that vLLM may shrink by bilinear interpolation ("anyres_max_9").

Registered under vLLM's own architecture name, ``LlavaOnevisionForConditionalGeneration``;
without the ``flashvlm`` key in ``hf_overrides`` every override below defers to vLLM's class.

An interpolated raster is no longer a subset of the tower's tokens, so there is no index map
from the tower to the merged sequence (as LLaVA-NeXT's ``anyres_layout``). The HF adapter
(``flashvlm.adapters.llava_onevision``) selects among the tokens the model really sends, with
features, saliency and keys moved through the model's own packing as extra channels; here
the same channels go through vLLM's own ``_merge_image_patch_embeddings``, with a newline row
marked in its last channel, so the layout is vLLM's and is not restated. As for LLaVA-NeXT,
every row's newline is kept (``newlines="every_row"`` in transformers) and the budget is
split between the base view and the crops.

SigLIP has no CLS token: saliency is the attention each patch receives, and the methods that
read a CLS row are refused at start-up. vLLM sends every image with its crops; transformers
sends only the base view of each image when a prompt holds several, so prompts with several
images differ from transformers already without flashvlm.

Videos are pruned as the HF adapter prunes them: each frame through the tower, projected and
2x2-pooled by vLLM's own ``apply_pooling``, with features, saliency and keys pooled alike as
channels; the budget counts per frame (``video_budget="per_frame"``, K slots per frame) or for
the whole video (``"per_video"``, K in all), and the newline that ends the video is always kept.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...pipeline import ImageSelection, TokenRegion, split_stacked_channels, stacked_channels
from .llava_next import AnyResInfoMixin, AnyResModelMixin, AnyResProcessorMixin
from .pruned_model import require_pixels
from .settings import SERVED_REQUIREMENTS
from .vision_cache import EncodedImage

#: What this path hands a method: SigLIP has no CLS token, so no CLS attention row.
ONEVISION_SERVED_REQUIREMENTS = SERVED_REQUIREMENTS - {"cls_attention"}


class PrunedLlavaOnevisionProcessingInfo(AnyResInfoMixin, LlavaOnevisionProcessingInfo):
    flashvlm_served = ONEVISION_SERVED_REQUIREMENTS


class PrunedLlavaOnevisionMultiModalProcessor(AnyResProcessorMixin, LlavaOnevisionMultiModalProcessor):
    flashvlm_modalities = ("image", "video")

    def flashvlm_video_placeholders(self, settings, stock, out_mm_kwargs, item_idx: int):
        # Stock: each frame's pooled tokens, then the video's one newline (always kept).
        num_frames = len(out_mm_kwargs["video"][item_idx]["pixel_values_videos"].data)
        per_frame = (len(stock) - 1) // num_frames
        return stock[: settings.num_kept_in_video(num_frames, per_frame) + 1]


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaOnevisionMultiModalProcessor,
    info=PrunedLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class PrunedLlavaOnevision(AnyResModelMixin, LlavaOnevisionForConditionalGeneration):
    flashvlm_served_requirements = ONEVISION_SERVED_REQUIREMENTS

    def embed_multimodal(self, **kwargs: object):
        if self.flashvlm is None:
            return super().embed_multimodal(**kwargs)
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, item_input in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            require_pixels(item_input)
            if modality == "image":
                embeddings += self.embed_pruned(item_input, kwargs)
            else:
                videos = list(item_input["pixel_values_videos"])  # (F, 3, H, W) each
                embeddings += self.keep_video_tokens(videos, kwargs, self.encode_videos, self.multi_modal_projector)
        return embeddings

    def encode_videos(self, videos: list[torch.Tensor], requirements: set[frozenset[str]]) -> list[EncodedImage]:
        """Each video before selection, from its (F, 3, H, W) frames, for methods of these
        ``requirements``: one tower pass over every frame, vLLM's own projection and pooling of
        the tokens, and the same pooling of the features, saliency and keys (as channels)."""
        tower = self.encode_with_saliency(torch.cat(videos), requirements)  # (ΣF, n, ...)
        tokens = self.apply_pooling(self.multi_modal_projector(tower.features))  # (ΣF, m, D)
        channels = self.apply_pooling(stacked_channels(tower))  # (ΣF, m, X)
        marker = torch.zeros_like(channels[0, :1])
        marker[0, -1] = 1.0  # the newline row of the channels
        encoded, first = [], 0
        for video in videos:
            frames = slice(first, first + len(video))
            first = frames.stop
            video_tokens = torch.cat([tokens[frames].flatten(0, 1), self.image_newline[None].to(tokens)])
            packed = torch.cat([channels[frames].flatten(0, 1), marker])
            item = split_stacked_channels(packed, tower, "video", video_tokens)
            # One "row": every frame token, then the video's newline.
            item.row_of = torch.zeros_like(item.is_newline, dtype=torch.long)
            positions = (~item.is_newline).nonzero().squeeze(-1)
            # Replaced per request by its video budget's units (keep_video_tokens).
            item.units = [ImageSelection.of("video", [TokenRegion(positions)])]
            encoded.append(EncodedImage(item, tower.saliency_kind, tower.key_heads))
        return encoded

    def encode_views(
        self, views: list[torch.Tensor], image_sizes: torch.Tensor, requirements: set[frozenset[str]]
    ) -> list[EncodedImage]:
        """Each image before selection, from its views (base + crops) and its (height, width),
        for methods of these ``requirements``: one tower pass over every view, then vLLM's own
        merge of each image's projected tokens, and of its features, saliency and keys."""
        tower = self.encode_with_saliency(torch.cat(views), requirements)  # (V, n, ...)
        projected = self.multi_modal_projector(tower.features)  # (V, n, D)
        channels = stacked_channels(tower)  # (V, n, X): features, saliency, keys, "is newline"
        marker = torch.zeros(channels.shape[-1], dtype=channels.dtype, device=channels.device)
        marker[-1] = 1.0  # the newline row of the channels
        base_tokens = projected.shape[1]
        side = int(round(base_tokens**0.5))

        images = []
        first_view = 0
        for image_size, image_views in zip(image_sizes, views):
            in_image = slice(first_view, first_view + len(image_views))
            first_view = in_image.stop
            merge = dict(strategy="spatial_unpad")
            tokens = self._merge_image_patch_embeddings(
                image_size, projected[in_image], image_newline=self.image_newline, **merge
            )  # (L, D), as vLLM sends it
            if len(image_views) > 1:
                packed = self._merge_image_patch_embeddings(
                    image_size, channels[in_image], image_newline=marker, **merge
                )
            else:  # vLLM's merge appends its own image_newline to a lone base view, whatever it is given
                packed = torch.cat([channels[in_image][0], marker[None]])
            item = split_stacked_channels(packed, tower, "image", tokens)
            real = (~item.is_newline).nonzero().squeeze(-1)  # where each patch token sits
            if len(image_views) > 1:  # the base view, then the crops' raster, a newline after each row
                crops = real[base_tokens:]
                num_rows = int(item.is_newline.sum())
                regions = [
                    TokenRegion(real[:base_tokens], (side, side)),
                    TokenRegion(crops, (num_rows, crops.numel() // num_rows)),
                ]
            else:  # the base view alone, then one newline
                regions = [TokenRegion(real, (side, side))]
            item.units = [ImageSelection.of("image", regions)]
            images.append(EncodedImage(item, tower.saliency_kind, tower.key_heads))
        return images
