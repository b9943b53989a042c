"""LLaVA-NeXT in vLLM with flashvlm: AnyRes images (a base view, then the crops' raster with
one newline token after each of its rows), CLIP tower, contiguous positions.

Registered under vLLM's own architecture name, ``LlavaNextForConditionalGeneration``;
without the ``flashvlm`` key in ``hf_overrides`` every override below defers to vLLM's class.

vLLM fixes each image's placeholder count from its size when it processes the prompt,
before the encoder runs. The HF adapter's default keeps a row's newline only when the row
keeps a token, so its count depends on the selection; here **every row's newline is kept**
(``flashvlm.prune(..., newlines="every_row")`` in transformers), and an image takes
``K + rows`` placeholders, ``rows`` following from its size. The budget counts the real
patch tokens of the base view and the crops together, and is split between them as the HF
adapter splits it: the selection is the shared pipeline's (:mod:`flashvlm.pipeline`).
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems

from ...pipeline import ImageSelection, TokenRegion, VisualItem
from .llava import LlavaTowerMixin
from .processing import PrunedInfoMixin, PrunedProcessorMixin
from .pruned_model import prompt_text_per_image
from .vision_cache import EncodedImage


def views_per_image(config, image_sizes: torch.Tensor) -> list[int]:
    """Tower inputs (base + crops) each image of (I, 2) (height, width) sizes really has; a
    batched tensor pads the others."""
    tile = config.vision_config.image_size
    return [image_size_to_num_patches(size, config.image_grid_pinpoints, tile) for size in image_sizes.tolist()]


class AnyResInfoMixin(PrunedInfoMixin):
    """For an AnyRes family's ``ProcessingInfo`` (LLaVA-NeXT, LLaVA-OneVision): each image's newlines."""

    def flashvlm_newlines(self, *, image_width: int, image_height: int) -> int:
        """Newline tokens of an image: one per row of its unpadded crop raster (vLLM's count)."""
        vision_encoder_info = self.get_vision_encoder_info()
        num_patch_height, num_patch_width = get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=self.get_hf_config().image_grid_pinpoints,
            patch_size=vision_encoder_info.get_image_size(),
        )
        _, newlines = self._get_num_unpadded_features(
            original_height=image_height,
            original_width=image_width,
            npatches=vision_encoder_info.get_patch_grid_length(),
            num_patch_height=num_patch_height,
            num_patch_width=num_patch_width,
        )
        return newlines


class PrunedLlavaNextProcessingInfo(AnyResInfoMixin, LlavaNextProcessingInfo):
    pass


class AnyResProcessorMixin(PrunedProcessorMixin):
    """For an AnyRes family's processor: ``K`` patch placeholders plus every row's newline."""

    def flashvlm_placeholder_ids(self) -> frozenset[int]:
        config = self.info.get_hf_config()
        return frozenset({config.image_token_index, getattr(config, "video_token_index", config.image_token_index)})

    def flashvlm_num_placeholders(self, settings, num_placeholders: int, mm_items, item_idx) -> int:
        size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
        rows = self.info.flashvlm_newlines(image_width=size.width, image_height=size.height)
        return settings.num_kept(num_placeholders - rows) + rows  # K patch tokens + every row's newline


class PrunedLlavaNextMultiModalProcessor(AnyResProcessorMixin, LlavaNextMultiModalProcessor):
    pass


class AnyResModelMixin(LlavaTowerMixin):
    """For an AnyRes family's model class: each image's views through the tower in one pass
    (:meth:`encode_views`, the family's), then the selection per image."""

    def embed_pruned(self, image_input, kwargs: dict) -> tuple[torch.Tensor, ...]:
        image_sizes = image_input["image_sizes"]  # (I, 2) as (height, width)
        counts = views_per_image(self.config, image_sizes)
        views = [views[:count] for views, count in zip(image_input["pixel_values"], counts)]  # (1 + P, 3, h, w) each
        texts = prompt_text_per_image(kwargs, len(counts))
        settings = self.settings_per_image(kwargs, len(counts))
        images = self.encode_images(
            views,
            [tuple(size) for size in image_sizes.tolist()],
            settings,
            lambda chosen: self.encode_views(
                [views[image] for image in chosen],
                image_sizes[chosen],
                {settings[image].selector.requires for image in chosen},
            ),
        )
        projector = self.multi_modal_projector
        return tuple(  # one (K + rows, D) per image
            self.keep_image_tokens(image.item, text, own, image.saliency_kind, image.key_heads, projector)
            for image, text, own in zip(images, texts, settings)
        )

    def encode_views(
        self, views: list[torch.Tensor], image_sizes: torch.Tensor, requirements: set[frozenset[str]]
    ) -> list[EncodedImage]:
        """Each image before selection, from its views (base + crops, (1 + P, 3, h, w) each) and
        its (height, width), for methods of these ``requirements``."""
        raise NotImplementedError


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaNextMultiModalProcessor, info=PrunedLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaNext(AnyResModelMixin, LlavaNextForConditionalGeneration):
    def anyres_layout(self, image_size: torch.Tensor) -> torch.Tensor:
        """Where each token of one image's merged sequence comes from: (L,) long, an index into
        the image's views' tokens flattened (base view first, then the crops: (1 + P) * n), or
        -1 for a row's newline. The order of vLLM's ``_merge_image_patch_embeddings``
        ("spatial_unpad"): base tokens, then the crops stitched into one raster with padding
        removed, row by row, each row followed by its newline."""
        vision_config = self.config.vision_config
        side = vision_config.image_size // vision_config.patch_size
        height, width = image_size.tolist()
        crop_rows, crop_cols = get_anyres_image_grid_shape(
            (height, width), self.config.image_grid_pinpoints, vision_config.image_size
        )
        index = torch.arange((1 + crop_rows * crop_cols) * side * side)
        crops = index[side * side :].view(crop_rows, crop_cols, side, side)
        raster = crops.permute(0, 2, 1, 3).reshape(1, crop_rows * side, crop_cols * side)
        raster = unpad_image(raster, (height, width))[0]  # (rows, cols)
        newlines = raster.new_full((raster.shape[0], 1), -1)
        return torch.cat([index[: side * side], torch.cat([raster, newlines], dim=1).flatten()])

    def anyres_sequence(self, source: torch.Tensor, view_tokens: torch.Tensor) -> torch.Tensor:
        """One image's merged sequence (L, D) from its views' tokens ((1 + P) * n, D) and its
        :meth:`anyres_layout` ``source`` (L,): what vLLM's merge gives for those tokens."""
        newline = self.image_newline.to(view_tokens)
        return torch.where((source < 0)[:, None], newline, view_tokens[source.clamp(min=0)])

    def encode_views(
        self, views: list[torch.Tensor], image_sizes: torch.Tensor, requirements: set[frozenset[str]]
    ) -> list[EncodedImage]:
        """Each image before selection, from its views (base + crops) and its (height, width),
        for methods of these ``requirements``: one tower pass over every view, then each
        image's tokens in vLLM's merge order."""
        tower = self.encode_with_saliency(torch.cat(views), requirements)  # (V, n, ...)
        projected = self.multi_modal_projector(tower.features)  # (V, n, D): every kept token comes from here

        images = []
        first_view = 0
        for image_size, image_views in zip(image_sizes, views):
            in_image = slice(first_view, first_view + len(image_views))
            first_view = in_image.stop
            source = self.anyres_layout(image_size).to(projected.device)  # (L,)
            is_newline = source < 0
            from_views = source.clamp(min=0)

            def in_sequence(per_view: torch.Tensor, in_image=in_image, from_views=from_views, is_newline=is_newline):
                """(V, n, ...) of this image's views -> (L, ...) in sequence order, zeros at newlines."""
                values = per_view[in_image].flatten(0, 1)[from_views]
                return values.masked_fill(is_newline.view(-1, *[1] * (values.dim() - 1)), 0)

            patch_places = (~is_newline).nonzero().squeeze(-1)  # (N,) where each patch token sits
            base_tokens = tower.features.shape[1]
            num_rows = int(is_newline.sum())
            crop_tokens = patch_places.numel() - base_tokens
            regions = [
                TokenRegion(patch_places[:base_tokens], tower.grid_shape),
                TokenRegion(patch_places[base_tokens:], (num_rows, crop_tokens // num_rows)),
            ]
            item = VisualItem(
                "image",
                in_sequence(tower.features),  # (L, C)
                tokens=self.anyres_sequence(source, projected[in_image].flatten(0, 1)),  # (L, D), as vLLM merges it
                saliency=None if tower.saliency is None else in_sequence(tower.saliency),  # (L,)
                keys=None if tower.keys is None else in_sequence(tower.keys),  # (L, C_k)
                is_newline=is_newline,
                units=[ImageSelection.of("image", regions)],
            )
            release = None if tower.release_saliency is None else in_sequence(tower.release_saliency)  # (L,)
            images.append(EncodedImage(item, tower.saliency_kind, tower.key_heads, release))
        return images
