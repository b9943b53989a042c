"""LLaVA-1.5 in vLLM with flashvlm: CLIP (or SigLIP) tower, MLP projector, contiguous positions.

Registered under vLLM's own architecture name, ``LlavaForConditionalGeneration``; without
the ``flashvlm`` key in ``hf_overrides`` every override below defers to vLLM's class.
"""

from __future__ import annotations

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...errors import FlashVLMError, UnsupportedModelError
from ...saliency import query_row_attention, received_attention
from ...selection import SelectionInputs
from .encoder import (
    PrunedModelMixin,
    gather_tensor_parallel_channels,
    mean_over_tensor_parallel_heads,
    tap_qkv_projection,
    text_ids_per_image,
)
from .processing import PrunedInfoMixin, TextGuidedProcessorMixin
from .settings import settings_of


class PrunedLlavaProcessingInfo(PrunedInfoMixin, LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        num_tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return num_tokens if self.flashvlm is None else self.flashvlm.num_kept(num_tokens)


class PrunedLlavaMultiModalProcessor(TextGuidedProcessorMixin, LlavaMultiModalProcessor):
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


@MULTIMODAL_REGISTRY.register_processor(build_processor, info=build_info, dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlava(PrunedModelMixin, LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = settings_of(self.config)
        if settings is not None:
            if self.config.vision_config.model_type == "pixtral":
                raise UnsupportedModelError(
                    "flashvlm's vLLM plug-in serves LLaVA with a CLIP or SigLIP tower, not Pixtral"
                )
            if not isinstance(self.config.vision_feature_layer, int):
                raise UnsupportedModelError(
                    f"vision_feature_layer={self.config.vision_feature_layer!r}: flashvlm supports one feature layer (an int)"
                )
        self.init_flashvlm(settings)

    def embed_multimodal(self, **kwargs: object):
        if self.flashvlm is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise FlashVLMError("flashvlm selects from pixels; precomputed image_embeds carry no encoder saliency")
        pixel_values = image_input["pixel_values"]  # (I, 3, H, W)
        text_ids = text_ids_per_image(kwargs, len(pixel_values))
        needs = self.flashvlm.selector.requires
        vision = self.vision_tower.vision_model
        # vLLM builds the tower only up to the feature layer, so that is its last layer.
        attention = vision.encoder.layers[-1].self_attn
        with tap_qkv_projection(attention.qkv_proj) as tap:
            features = self._image_pixels_to_features(self.vision_tower, pixel_values)  # (I, N, C)

        default_strategy = self.config.vision_feature_select_strategy == "default"
        first_patch = 1 if default_strategy else 0  # "default" drops the CLS token, "full" keeps it
        has_cls = hasattr(vision.embeddings, "class_embedding")
        heads = attention.num_heads_per_partition
        if has_cls:
            saliency = query_row_attention(tap.queries, tap.keys, heads, 0, attention.scale)[:, first_patch:]
        else:
            saliency = received_attention(tap.queries, tap.keys, heads, attention.scale)
        saliency = mean_over_tensor_parallel_heads(saliency, attention)  # (I, N)
        keys = None
        if "keys" in needs:
            keys = gather_tensor_parallel_channels(tap.keys, attention)[:, first_patch:]  # (I, N, C_k)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        grid = (side, side) if default_strategy else None
        projector = self.multi_modal_projector
        projected = projector(features) if "projected" in needs else None  # (I, N, D)

        kept_tokens = []
        for image in range(len(pixel_values)):
            one = slice(image, image + 1)
            inputs = SelectionInputs(
                features=features[one],
                saliency=saliency[one],
                saliency_kind="cls" if has_cls else "received",
                projected=None if projected is None else projected[one],
                keys=None if keys is None else keys[one],
                key_heads=attention.num_heads,
                grid_shape=grid,
            )
            selection = self.select_image(inputs, text_ids[image])
            indices = selection.indices[0]
            if selection.features is not None:
                kept_tokens.append(projector(selection.features[0]))
            elif projected is not None:
                kept_tokens.append(projected[image, indices])
            else:
                kept_tokens.append(projector(features[image, indices]))  # project only the kept rows
        return tuple(kept_tokens)  # one (K, D) per image
