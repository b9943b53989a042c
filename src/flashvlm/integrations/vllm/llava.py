"""LLaVA-1.5 in vLLM with flashvlm: CLIP (or SigLIP) tower, MLP projector, contiguous positions.

Registered under vLLM's own architecture name, ``LlavaForConditionalGeneration``; without
the ``flashvlm`` key in ``hf_overrides`` every override below defers to vLLM's class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...errors import UnsupportedModelError
from ...pipeline import ImageSelection, TokenRegion, VisualItem
from ...saliency import query_row_attention, received_attention, release_cls_attention
from .processing import PrunedInfoMixin, PrunedProcessorMixin
from .pruned_model import (
    PrunedModelMixin,
    gather_tensor_parallel_channels,
    mean_over_tensor_parallel_heads,
    prompt_text_per_image,
    require_pixels,
    tap_qkv_projection,
)
from .settings import SERVED_REQUIREMENTS, settings_of
from .vision_cache import EncodedImage, rows


class PrunedLlavaProcessingInfo(PrunedInfoMixin, LlavaProcessingInfo):
    """vLLM's, with the settings (an image's placeholders are cut to K by the processor)."""


class PrunedLlavaMultiModalProcessor(PrunedProcessorMixin, LlavaMultiModalProcessor):
    def flashvlm_placeholder_ids(self) -> frozenset[int]:
        return frozenset({self.info.get_hf_config().image_token_index})


def build_info(ctx):
    info = _build_llava_or_pixtral_hf_info(ctx)
    # Pixtral-HF towers stay stock (their images vary in size; flashvlm refuses them below).
    return PrunedLlavaProcessingInfo(ctx) if isinstance(info, LlavaProcessingInfo) else info


def build_processor(info, dummy_inputs):
    if isinstance(info, PrunedLlavaProcessingInfo):
        return PrunedLlavaMultiModalProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


@dataclass
class TowerOutputs:
    """What a LLaVA tower gives the methods for a stack of V tower inputs (images or views)."""

    features: torch.Tensor  # (V, N, C) the feature layer's patch tokens, as the projector takes them
    saliency: torch.Tensor | None  # (V, N) float32, CLS row or attention received, mean over all heads
    release_saliency: torch.Tensor | None  # (V, N) the release's CLS attention, for methods that ask for it
    saliency_kind: str  # "cls" or "received"
    keys: torch.Tensor | None  # (V, N, C_k) the feature layer's keys, only when a method reads them
    key_heads: int
    grid_shape: tuple[int, int] | None  # (side, side) of one input's raster; None with the "full" strategy


class LlavaTowerMixin(PrunedModelMixin):
    """For vLLM's LLaVA-family classes: the settings read at start-up, and their CLIP/SigLIP
    tower run with a q/k tap on the feature layer (vLLM builds the tower only up to that
    layer, so it is the last one)."""

    #: What the family hands a method (a SigLIP-only family has no CLS row).
    flashvlm_served_requirements: frozenset[str] = SERVED_REQUIREMENTS

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = settings_of(self.config, self.flashvlm_served_requirements)
        if settings is not None:
            self.check_flashvlm_config()
        self.init_flashvlm(settings, self.flashvlm_served_requirements, vllm_config)

    def check_flashvlm_config(self) -> None:
        """Refuse, at start-up, towers and layer settings flashvlm does not select from."""
        if self.config.vision_config.model_type == "pixtral":
            raise UnsupportedModelError("flashvlm's vLLM plug-in serves LLaVA with a CLIP or SigLIP tower, not Pixtral")
        if not isinstance(self.config.vision_feature_layer, int):
            raise UnsupportedModelError(
                f"vision_feature_layer={self.config.vision_feature_layer!r}: flashvlm supports one feature layer (an int)"
            )

    def embed_multimodal(self, **kwargs: object):
        if self.flashvlm is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        require_pixels(image_input)
        return self.embed_pruned(image_input, kwargs)

    def embed_pruned(self, image_input, kwargs: dict) -> tuple[torch.Tensor, ...]:
        """The kept tokens of each image of vLLM's parsed ``image_input`` (pixels), one
        tensor each; ``kwargs`` are ``embed_multimodal``'s (they carry the prompt's text ids
        and any request's own settings)."""
        raise NotImplementedError

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The feature layer's tokens (V, N, C) of (V, 3, H, W) inputs, as vLLM's class computes them."""
        return self._image_pixels_to_features(self.vision_tower, pixel_values)

    def encode_with_saliency(self, pixel_values: torch.Tensor, requirements: set[frozenset[str]]) -> TowerOutputs:
        """The tower on (V, 3, H, W) inputs, with saliency (and keys) from the feature layer's q/k,
        as the methods of a batch's requests (their ``requirements``) read them."""
        needs = frozenset().union(*requirements)
        vision = self.vision_tower.vision_model
        attention = vision.encoder.layers[-1].self_attn
        with tap_qkv_projection(attention.qkv_proj) as tap:
            features = self.tower_features(pixel_values)  # (V, N, C)

        default_strategy = self.config.vision_feature_select_strategy == "default"
        first_patch = 1 if default_strategy else 0  # "default" drops the CLS token, "full" keeps it
        has_cls = hasattr(vision.embeddings, "class_embedding")
        heads = attention.num_heads_per_partition
        saliency = release_saliency = None
        if has_cls and "release_saliency" in needs:
            # As the release's tower computes it (the release presets), over every rank's heads.
            queries, keys = (gather_tensor_parallel_channels(tap_out, attention) for tap_out in (tap.queries, tap.keys))
            release_saliency = release_cls_attention(queries, keys, attention.num_heads, attention.scale, first_patch)
        if release_saliency is None or any("release_saliency" not in need for need in requirements):
            if has_cls:
                saliency = query_row_attention(tap.queries, tap.keys, heads, 0, attention.scale)[:, first_patch:]
            else:
                saliency = received_attention(tap.queries, tap.keys, heads, attention.scale)
            saliency = mean_over_tensor_parallel_heads(saliency, attention)  # (V, N)
        keys = None
        if "keys" in needs:
            keys = gather_tensor_parallel_channels(tap.keys, attention)[:, first_patch:]  # (V, N, C_k)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return TowerOutputs(
            features,
            saliency,
            release_saliency,
            "cls" if has_cls else "received",
            keys,
            attention.num_heads,
            (side, side) if default_strategy else None,
        )


@MULTIMODAL_REGISTRY.register_processor(build_processor, info=build_info, dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlava(LlavaTowerMixin, LlavaForConditionalGeneration):
    def embed_pruned(self, image_input, kwargs: dict) -> tuple[torch.Tensor, ...]:
        pixel_values = image_input["pixel_values"]  # (I, 3, H, W)
        texts = prompt_text_per_image(kwargs, len(pixel_values))
        settings = self.settings_per_image(kwargs, len(pixel_values))
        images = self.encode_images(
            list(pixel_values),
            [None] * len(pixel_values),
            settings,
            lambda chosen: self.encode_pixels(
                rows(pixel_values, chosen), {settings[image].selector.requires for image in chosen}
            ),
        )
        projector = self.multi_modal_projector
        return tuple(  # one (K, D) per image
            self.keep_image_tokens(image.item, text, own, image.saliency_kind, image.key_heads, projector)
            for image, text, own in zip(images, texts, settings)
        )

    def encode_pixels(self, pixel_values: torch.Tensor, requirements: set[frozenset[str]]) -> list[EncodedImage]:
        """Each image of (I, 3, H, W) pixels before selection, for methods of these
        ``requirements``: one tower pass over all of them."""
        tower = self.encode_with_saliency(pixel_values, requirements)
        features = tower.features  # (I, N, C)
        projected = None
        if any("projected" in need for need in requirements):
            projected = self.multi_modal_projector(features)  # (I, N, D)
        positions = torch.arange(features.shape[1], device=features.device)
        return [
            EncodedImage(
                VisualItem(
                    "image",
                    features[image],
                    tokens=None if projected is None else projected[image],
                    saliency=None if tower.saliency is None else tower.saliency[image],
                    keys=None if tower.keys is None else tower.keys[image],
                    units=[ImageSelection.of("image", [TokenRegion(positions, tower.grid_shape)])],
                ),
                tower.saliency_kind,
                tower.key_heads,
                None if tower.release_saliency is None else tower.release_saliency[image],
            )
            for image in range(len(pixel_values))
        ]
