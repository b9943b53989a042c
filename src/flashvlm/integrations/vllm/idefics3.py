"""Idefics3 and SmolVLM in vLLM with flashvlm: SigLIP on split sub-images plus a global view,
a pixel shuffle, row/column markers, contiguous positions.

Registered under ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``;
without the ``flashvlm`` key in ``hf_overrides`` every override below defers to vLLM's class.

vLLM lays an image out as one placeholder run per sub-image, each after its markers
(``<fake_token_around_image><row_1_col_1>``, ..., ``<global-img>``), and fixes every run's
length before the encoder runs. The HF adapter's default (``tile_budget="per_image"``)
selects an image's sub-images jointly, so how many tokens each run keeps is known only after
the selection; here **each sub-image and the global view keep a share of K in proportion to
their tokens** (``flashvlm.prune(..., tile_budget="per_tile")`` in transformers; each share
computed by :func:`flashvlm.pipeline.per_tile_counts`, as the HF adapter's selection splits it).
As in the HF adapter (``flashvlm.adapters.idefics3``): saliency is the attention each patch
receives in the tower's last layer, padding patches excluded, averaged over each pixel-shuffle
group, and keys likewise; SigLIP has no CLS token, so methods that read a CLS row are refused.
vLLM's Idefics3 takes images only.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.idefics3 import (
    Idefics3DummyInputsBuilder,
    Idefics3ForConditionalGeneration,
    Idefics3MultiModalProcessor,
    Idefics3ProcessingInfo,
)
from vllm.model_executor.models.smolvlm import SmolVLMForConditionalGeneration, SmolVLMProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems

from ...errors import FlashVLMError
from ...pipeline import VisualItem, items_of_views, per_tile_counts, tiled_image_unit
from ...saliency import received_attention
from .processing import PrunedInfoMixin, PrunedProcessorMixin, cut_embedding_runs
from .pruned_model import (
    PrunedModelMixin,
    gather_tensor_parallel_channels,
    mean_over_tensor_parallel_heads,
    prompt_text_per_image,
    require_pixels,
    tap_qkv_projection,
)
from .settings import SERVED_REQUIREMENTS, settings_of
from .vision_cache import EncodedImage

#: SigLIP has no CLS token: no CLS row to hand a method.
IDEFICS3_SERVED_REQUIREMENTS = SERVED_REQUIREMENTS - {"cls_attention"}


class PrunedIdefics3InfoMixin(PrunedInfoMixin):
    flashvlm_served = IDEFICS3_SERVED_REQUIREMENTS


class PrunedIdefics3ProcessingInfo(PrunedIdefics3InfoMixin, Idefics3ProcessingInfo):
    pass


class PrunedSmolVLMProcessingInfo(PrunedIdefics3InfoMixin, SmolVLMProcessingInfo):
    pass


class PrunedIdefics3MultiModalProcessor(PrunedProcessorMixin, Idefics3MultiModalProcessor):
    def flashvlm_placeholder_ids(self) -> frozenset[int]:
        return frozenset({self.info.get_hf_config().image_token_id})

    def flashvlm_image_placeholders(self, settings, stock, mm_items, item_idx: int):
        # Each sub-image's run keeps its share of K; the markers and line breaks stay.
        per_view = self.info.get_hf_processor().image_seq_len
        num_views = int(stock.is_embed(stock.full).sum()) // per_view
        counts = per_tile_counts(num_views, per_view, settings.budget, settings.selector.keeps_all)
        return cut_embedding_runs(stock, counts)

    def flashvlm_num_images(self, processed) -> int:
        return len(processed.get("num_patches", ()))  # sub-images come flat

    def flashvlm_guiding_prompt(self, prompt: list[int], processed, mm_items) -> list[int]:
        """The prompt with each image placeholder replaced by vLLM's own layout of the image
        (its markers, line breaks and placeholders), as in the prompt transformers expands.
        Needs every image of the prompt in ``mm_items``; where vLLM's processor cache held
        some, the prompt is taken as it came (docs/vllm.md)."""
        image_token = self.info.get_hf_config().image_token_id
        images = mm_items.get_items("image", ImageProcessorItems) if "image" in mm_items else []
        if len(images) != prompt.count(image_token):
            return prompt
        processor, tokenizer = self.info.get_hf_processor(), self.info.get_tokenizer()
        expanded, image = [], 0
        for token in prompt:
            if token != image_token:
                expanded.append(token)
                continue
            size = images.get_image_size(image)
            image += 1
            layout = self.info.get_image_repl(
                image_width=size.width, image_height=size.height, processor=processor, mm_kwargs={}
            )
            expanded += tokenizer.encode(layout, add_special_tokens=False)
        return expanded


class PrunedIdefics3Mixin(PrunedModelMixin):
    """For vLLM's Idefics3 and SmolVLM classes: each image's sub-images through the tower in
    one pass, then the selection per image with every sub-image its own share."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = settings_of(self.config, IDEFICS3_SERVED_REQUIREMENTS)
        self.init_flashvlm(settings, IDEFICS3_SERVED_REQUIREMENTS, vllm_config)

    def embed_multimodal(self, **kwargs: object):
        if self.flashvlm is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        require_pixels(image_input)
        counts = torch.as_tensor(image_input["num_patches"]).tolist()
        pixels = list(image_input["pixel_values"].split(counts))  # (S_i, 3, H, W) each
        masks = list(image_input["pixel_attention_mask"].split(counts))  # (S_i, H, W) each
        texts = prompt_text_per_image(kwargs, len(counts))
        settings = self.settings_per_image(kwargs, len(counts))
        # The tower reads the pixel mask too (padding patches): each image's patch mask is in its key.
        patch_masks = [self.model.get_patch_attention_mask(mask).cpu().numpy().tobytes() for mask in masks]
        encoded = self.encode_images(
            pixels,
            patch_masks,
            settings,
            lambda chosen: self.encode_sub_images(
                [pixels[image] for image in chosen],
                [masks[image] for image in chosen],
                {settings[image].selector.requires for image in chosen},
            ),
        )
        project = self.model.connector.modality_projection
        kept = []
        for one, text, own, views in zip(encoded, texts, settings, pixels):
            item = one.item
            item.units = [tiled_image_unit(len(views), item.length // len(views), item.features.device, True)]
            kept.append(self.keep_image_tokens(item, text, own, one.saliency_kind, one.key_heads, project))
        return tuple(kept)

    def group_mean(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(S, n, X) -> (S, m, X): the mean over each pixel-shuffle group (each X-wide block is one patch)."""
        connector = self.model.connector
        shuffled = connector.pixel_shuffle(per_patch, connector.scale_factor)  # (S, m, s * s * X)
        return shuffled.view(*shuffled.shape[:2], -1, per_patch.shape[-1]).mean(dim=2)

    def encode_sub_images(
        self, pixels: list[torch.Tensor], masks: list[torch.Tensor], requirements: set[frozenset[str]]
    ) -> list[EncodedImage]:
        """Each image of (S_i, 3, H, W) sub-images (and its (S_i, H, W) pixel mask) before
        selection, one tower pass over all of them: shuffled features (S_i * m, s * s * C),
        saliency (S_i * m,), and keys and projected tokens for the methods that read them."""
        needs = frozenset().union(*requirements)
        pixel_mask = torch.cat(masks)
        attention = self.model.vision_model.encoder.layers[-1].self_attn
        with tap_qkv_projection(attention.qkv_proj) as tap:
            hidden = self.model.image_pixels_to_features(torch.cat(pixels), pixel_attention_mask=pixel_mask)
        if len(hidden) != len(pixel_mask):
            raise FlashVLMError("an all-zero sub-image was dropped as padding: flashvlm cannot place its tokens")
        connector = self.model.connector
        features = connector.pixel_shuffle(hidden, connector.scale_factor)  # (S, m, s * s * C)
        patch_mask = self.model.get_patch_attention_mask(pixel_mask).flatten(1)  # (S, n): real patches
        heads = attention.num_heads_per_partition
        saliency = received_attention(tap.queries, tap.keys, heads, attention.scale, key_mask=patch_mask)
        saliency = self.group_mean(mean_over_tensor_parallel_heads(saliency, attention)[..., None]).squeeze(-1)
        keys = None
        if "keys" in needs:
            keys = self.group_mean(gather_tensor_parallel_channels(tap.keys, attention))  # (S, m, C)
        tokens = connector.modality_projection(features) if "projected" in needs else None  # (S, m, D)
        stack = VisualItem("image", features, tokens=tokens, saliency=saliency, keys=keys)
        return [
            EncodedImage(item, "received", attention.num_heads)
            for item in items_of_views(stack, [len(views) for views in pixels])
        ]


@MULTIMODAL_REGISTRY.register_processor(
    PrunedIdefics3MultiModalProcessor, info=PrunedIdefics3ProcessingInfo, dummy_inputs=Idefics3DummyInputsBuilder
)
class PrunedIdefics3(PrunedIdefics3Mixin, Idefics3ForConditionalGeneration):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunedIdefics3MultiModalProcessor, info=PrunedSmolVLMProcessingInfo, dummy_inputs=Idefics3DummyInputsBuilder
)
class PrunedSmolVLM(PrunedIdefics3Mixin, SmolVLMForConditionalGeneration):
    pass
