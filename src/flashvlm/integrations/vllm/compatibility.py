"""Which vLLM APIs the plug-in relies on, and a check of a vLLM source tree against them.

:data:`INVENTORY` lists, once, every vLLM name the plug-in's modules import, subclass, override,
call or read: the classes it subclasses or wraps, the methods it overrides or calls (with the
parameters it passes or expects), the attributes it reads from vLLM's objects, and the places
where vLLM calls the plug-in's overrides. :func:`check_source_tree` checks a vLLM source tree
against it **without importing vLLM**: it parses the ``.py`` files with :mod:`ast`, follows
imports, re-exports and simple base-class inheritance inside vLLM, and returns one line per
problem. So a release that cannot be installed here (vLLM 0.33 has no CPU build) is checked
from its wheel's sources (``make vllm-033-check``, docs/vllm.md "vLLM versions").
:func:`changed_definitions` compares two trees entry by entry: what a reviewer reads before
widening the supported range.

The check is static. It finds a renamed, moved or removed name, a parameter renamed or
reordered, and an attribute vLLM no longer sets; it cannot see a changed return value or
tensor layout behind the same names (``changed_definitions`` points at those definitions).

This module needs only the standard library, so it also runs as a script, outside any
environment::

    python src/flashvlm/integrations/vllm/compatibility.py check .vllm-sources/vllm-0.33.0
"""

from __future__ import annotations

import argparse
import ast
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


class VllmApi(NamedTuple):
    """One vLLM name the plug-in relies on.

    ``module`` is where the plug-in finds it (it may be re-exported from elsewhere) and
    ``name`` its qualified name there: ``"Class"``, ``"Class.method"``, ``"Class.attribute"``
    (a class-level or ``self.`` attribute; an instance such as ``vllm.ModelRegistry`` stands
    for its class), ``"function"`` or ``"CONSTANT"``.
    """

    module: str
    name: str
    #: Parameter names a callable must have, in this order (others may come between them).
    params: tuple[str, ...] | None = None
    #: The literal a module-level constant must be assigned.
    value: str | None = None
    #: Methods this vLLM function must call (``x.name(...)``): where vLLM calls the plug-in's
    #: overrides. How it calls them is compared between releases by ``changed_definitions``.
    calls: tuple[str, ...] | None = None


_LLAVA = "vllm.model_executor.models.llava"
_LLAVA_NEXT = "vllm.model_executor.models.llava_next"
_ONEVISION = "vllm.model_executor.models.llava_onevision"
_NEXT_VIDEO = "vllm.model_executor.models.llava_next_video"
_INTERNVL = "vllm.model_executor.models.interns1"
_INTERNVIT = "vllm.model_executor.models.interns1_vit"
_IDEFICS3 = "vllm.model_executor.models.idefics3"
_SMOLVLM = "vllm.model_executor.models.smolvlm"
_IDEFICS2_VISION = "vllm.model_executor.models.idefics2_vision_model"
_QWEN = "vllm.model_executor.models.qwen2_5_vl"
_QWEN2 = "vllm.model_executor.models.qwen2_vl"
_QWEN3 = "vllm.model_executor.models.qwen3_vl"
_QWEN3_MOE = "vllm.model_executor.models.qwen3_vl_moe"
_CLIP = "vllm.model_executor.models.clip"
_SIGLIP = "vllm.model_executor.models.siglip"
_PROCESSING = "vllm.multimodal.processing"


def _family_model(module: str, cls: str, *, tower: str) -> list[VllmApi]:
    """What a LLaVA-family model class (the plug-in's ``LlavaTowerMixin``) uses of it."""
    return [
        VllmApi(module, cls),
        VllmApi(module, f"{cls}.__init__", ("vllm_config", "prefix")),
        VllmApi(module, f"{cls}.config"),
        VllmApi(module, f"{cls}.vision_tower"),
        VllmApi(module, f"{cls}.multi_modal_projector"),
        VllmApi(module, f"{cls}.get_language_model"),
        VllmApi(module, f"{cls}.load_weights", ("weights",)),
        VllmApi(module, f"{cls}.embed_multimodal"),
        VllmApi(module, f"{cls}._parse_and_validate_image_input"),
        VllmApi(module, f"{cls}._image_pixels_to_features", ("vision_tower", "pixel_values")),
        VllmApi(module, f"{tower}.type"),
        VllmApi(module, f"{tower}.pixel_values"),
    ]


def _processor(module: str, cls: str) -> list[VllmApi]:
    """What the plug-in's ``PrunedProcessorMixin`` overrides on a family's processor."""
    return [
        VllmApi(module, cls),
        VllmApi(module, f"{cls}.__init__", ("info", "dummy_inputs")),
        VllmApi(module, f"{cls}.info"),
        VllmApi(module, f"{cls}.apply", ("inputs", "timing_ctx")),
        VllmApi(module, f"{cls}._apply_hf_processor_main", ("mm_items", "hf_kwargs")),
        VllmApi(module, f"{cls}._get_mm_fields_config", ("hf_inputs", "hf_processor_mm_kwargs")),
        VllmApi(module, f"{cls}._get_prompt_updates", ("mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs")),
    ]


def _processing_info(module: str, cls: str, num_image_tokens: tuple[str, ...] | None = None) -> list[VllmApi]:
    """What the plug-in's ``PrunedInfoMixin`` and a family's info class use of it
    (``num_image_tokens``: the parameters of ``get_num_image_tokens``, where the family overrides it)."""
    apis = [
        VllmApi(module, cls),
        VllmApi(module, f"{cls}.__init__", ("ctx",)),
        VllmApi(module, f"{cls}.ctx"),
        VllmApi(module, f"{cls}.get_hf_config"),
    ]
    if num_image_tokens is not None:
        apis.append(VllmApi(module, f"{cls}.get_num_image_tokens", num_image_tokens))
    return apis


def _attention(module: str, prefix: str) -> list[VllmApi]:
    """A CLIP/SigLIP tower, down to the feature layer's attention that ``encode_with_saliency`` taps."""
    return [
        VllmApi(module, f"{prefix}VisionModel"),
        VllmApi(module, f"{prefix}VisionModel.vision_model"),
        VllmApi(module, f"{prefix}VisionTransformer.encoder"),
        VllmApi(module, f"{prefix}VisionTransformer.embeddings"),
        VllmApi(module, f"{prefix}Encoder.layers"),
        VllmApi(module, f"{prefix}EncoderLayer.self_attn"),
        *(
            VllmApi(module, f"{prefix}Attention.{name}")
            for name in ("qkv_proj", "num_heads", "num_heads_per_partition", "scale", "tp_size")
        ),
    ]


def _qwen_vl(
    module: str,
    prefix: str,
    vision: str,
    *,
    merger_norm: str = "ln_q",
    metadata_grid: str = "grid_thw",
    grid_walk: tuple[str, tuple[str, ...]] = ("iter_mm_grid_thw", ("mm_features",)),
    own_inputs: bool = True,
) -> list[VllmApi]:
    """A Qwen-VL family: its processing and model classes (``{prefix}...``), down to the tower's
    attention and merger (``{vision}...``) that ``PrunedQwenVLMixin`` taps. ``merger_norm``: the
    merger's first norm; ``metadata_grid``: the grids' parameter of the tower's
    ``prepare_encoder_metadata`` (the plug-in passes it by position); ``grid_walk``: the model's method that walks the prompt's visual runs, and
    its parameters; ``own_inputs``: the module defines its image inputs and attention (Qwen3-VL
    reuses Qwen2.5-VL's)."""
    model = f"{prefix}ForConditionalGeneration"
    apis = [
        VllmApi(module, f"{prefix}DummyInputsBuilder"),
        *_processing_info(
            module, f"{prefix}ProcessingInfo", ("image_width", "image_height", "image_processor", "mm_kwargs")
        ),
        *_processor(module, f"{prefix}MultiModalProcessor"),
        VllmApi(module, model),
        VllmApi(module, f"{model}.__init__", ("vllm_config", "prefix")),
        *(
            VllmApi(module, f"{model}.{name}")
            for name in ("config", "visual", "use_data_parallel", "get_language_model", "embed_multimodal")
        ),
        VllmApi(module, f"{model}.load_weights", ("weights",)),
        VllmApi(module, f"{model}.get_mrope_input_positions", ("input_tokens", "mm_features")),
        VllmApi(module, f"{model}.{grid_walk[0]}", grid_walk[1]),
        VllmApi(module, f"{model}.embed_input_ids", ("input_ids", "multimodal_embeddings", "is_multimodal")),
        VllmApi(module, f"{model}.forward", ("input_ids", "positions", "intermediate_tensors", "inputs_embeds")),
        VllmApi(module, f"{model}._parse_and_validate_multimodal_inputs"),
        *(
            VllmApi(module, f"{vision}Transformer.{name}")
            for name in ("blocks", "merger", "spatial_merge_size", "num_heads")
        ),
        VllmApi(module, f"{vision}Transformer.prepare_encoder_metadata", (metadata_grid,)),
        VllmApi(module, f"{vision}Transformer.forward", ("x", "grid_thw", "encoder_metadata")),
        VllmApi(module, f"{vision}Block.attn"),
        VllmApi(module, f"{vision}PatchMerger.{merger_norm}"),
    ]
    if own_inputs:
        apis += [
            *(
                VllmApi(module, f"{prefix}ImagePixelInputs.{name}")
                for name in ("type", "pixel_values", "image_grid_thw")
            ),
            *(
                VllmApi(module, f"{prefix}VideoPixelInputs.{name}")
                for name in ("type", "pixel_values_videos", "video_grid_thw")
            ),
            *(
                VllmApi(module, f"{vision}Attention.{name}")
                for name in (
                    "apply_rotary_emb",
                    "num_attention_heads_per_partition",
                    "hidden_size_per_attention_head",
                    "tp_size",
                )
            ),
            VllmApi(module, f"{vision}Attention.forward"),  # q and k stacked for apply_rotary_emb
        ]
    return apis


#: What the plug-in uses of Qwen3-VL (its MoE class and info subclass these, in their own module).
_QWEN3_APIS = [
    *_qwen_vl(
        _QWEN3,
        "Qwen3VL",
        "Qwen3_Vision",
        merger_norm="norm",
        metadata_grid="grid_thw_list",
        grid_walk=(
            "_iter_mm_grid_hw",
            (
                "input_tokens",
                "mm_features",
                "video_token_id",
                "vision_start_token_id",
                "vision_end_token_id",
                "spatial_merge_size",
            ),
        ),
        own_inputs=False,
    ),
    VllmApi(_QWEN3, "Qwen3VLForConditionalGeneration.visual_dim"),
    VllmApi(_QWEN3, "Qwen3VLForConditionalGeneration.multiscale_dim"),
    VllmApi(_QWEN3, "Qwen3_VisionBlock.forward"),  # Qwen2_5_VisionAttention, as Qwen2.5-VL's
    # A pruned video's frames laid out as vLLM lays them out, with K placeholders each.
    VllmApi(
        _QWEN3,
        "Qwen3VLMultiModalProcessor.get_video_repl",
        (
            "tokens_per_frame",
            "timestamps",
            "tokenizer",
            "vision_start_token_id",
            "vision_end_token_id",
            "video_token_id",
            "select_token_id",
        ),
    ),
    VllmApi(_PROCESSING, "PromptUpdateDetails.full"),
]


#: What ``PrunedIdefics3Mixin`` uses of vLLM's Idefics3 class (and of SmolVLM's, its subclass).
_IDEFICS3_MODEL_APIS = [
    VllmApi(_IDEFICS3, "Idefics3ForConditionalGeneration"),
    VllmApi(_IDEFICS3, "Idefics3ForConditionalGeneration.__init__", ("vllm_config", "prefix")),
    *(
        VllmApi(_IDEFICS3, f"Idefics3ForConditionalGeneration.{name}")
        for name in ("config", "model", "get_language_model", "embed_multimodal", "_parse_and_validate_image_input")
    ),
    VllmApi(_IDEFICS3, "Idefics3ForConditionalGeneration.load_weights", ("weights",)),
]


def _as_subclasses(apis: list[VllmApi], module: str, classes: dict[str, str]) -> list[VllmApi]:
    """``apis`` on the classes of ``module`` that subclass them (``classes``: base -> subclass):
    what the plug-in uses of a base class it uses of the subclass as well."""
    found = []
    for api in apis:
        owner, _, member = api.name.partition(".")
        if owner in classes:
            name = classes[owner] + (f".{member}" if member else "")
            found.append(VllmApi(module, name, api.params, api.value, api.calls))
    return found


#: Every vLLM API the plug-in (src/flashvlm/integrations/vllm/) relies on.
INVENTORY: tuple[VllmApi, ...] = (
    # -- __init__.py: the entry point, registration, the refusal of unserved architectures --
    VllmApi("vllm.plugins", "DEFAULT_PLUGINS_GROUP", value="vllm.general_plugins"),
    VllmApi("vllm.plugins", "load_general_plugins"),
    VllmApi("vllm", "__version__"),
    VllmApi("vllm", "ModelRegistry"),
    VllmApi("vllm", "ModelRegistry.register_model", ("model_arch", "model_cls")),
    VllmApi("vllm", "ModelRegistry.inspect_model_cls", ("architectures", "model_config")),
    VllmApi("vllm.config.model", "ModelConfig.hf_config"),
    VllmApi("vllm.config.model", "ModelConfig.__post_init__", calls=("inspect_model_cls",)),
    # -- processing.py: K placeholders per image, the prompt's text and a request's settings as per-image fields --
    VllmApi(_PROCESSING, "BaseProcessingInfo.ctx"),
    VllmApi(_PROCESSING, "InputProcessingContext.model_config"),
    VllmApi(_PROCESSING, "BaseMultiModalProcessor.apply", ("inputs", "timing_ctx")),
    VllmApi(
        _PROCESSING,
        "BaseMultiModalProcessor._apply_hf_processor",
        calls=("_apply_hf_processor_main", "_get_mm_fields_config"),
    ),
    VllmApi(
        _PROCESSING,
        "BaseMultiModalProcessor._cached_apply_hf_processor",
        calls=("_apply_hf_processor_main", "_get_mm_fields_config"),
    ),
    VllmApi(_PROCESSING, "BaseMultiModalProcessor._get_mm_prompt_updates", calls=("_get_prompt_updates",)),
    VllmApi(_PROCESSING, "PromptUpdate.modality"),
    VllmApi(_PROCESSING, "PromptReplacement.replacement"),
    VllmApi("vllm.multimodal.processing.inputs", "ProcessorInputs.prompt"),
    VllmApi("vllm.multimodal.processing.inputs", "ProcessorInputs.hf_processor_mm_kwargs"),
    VllmApi("vllm.renderers.base", "BaseRenderer._process_multimodal", calls=("apply",)),
    VllmApi("vllm.multimodal.inputs", "MultiModalFieldConfig"),
    VllmApi("vllm.multimodal.inputs", "MultiModalFieldConfig.batched", ("modality",)),
    VllmApi("vllm.multimodal", "MULTIMODAL_REGISTRY"),
    VllmApi("vllm.multimodal", "MULTIMODAL_REGISTRY.register_processor", ("processor", "info", "dummy_inputs")),
    VllmApi("vllm.multimodal.registry", "_ProcessorFactories.build_processor", ("ctx",), calls=("info", "processor")),
    # -- pruned_model.py: tensor parallelism, text embeddings, the vision cache --
    VllmApi("vllm.distributed", "tensor_model_parallel_all_reduce", ("input_",)),
    VllmApi("vllm.distributed", "tensor_model_parallel_all_gather", ("input_", "dim")),
    VllmApi("vllm.model_executor.models.interfaces", "SupportsMultiModal.get_language_model"),
    VllmApi("vllm.model_executor.models.interfaces_base", "VllmModel.embed_input_ids", ("input_ids",)),
    VllmApi("vllm.config.vllm", "VllmConfig.lora_config"),  # the vision cache is off with LoRA
    # -- llava.py: LLaVA-1.5, and the CLIP/SigLIP towers both LLaVA families tap --
    VllmApi(_LLAVA, "LlavaDummyInputsBuilder"),
    VllmApi(_LLAVA, "_build_llava_or_pixtral_hf_info", ("ctx",)),
    VllmApi(_LLAVA, "_build_llava_or_pixtral_hf_processor", ("info", "dummy_inputs")),
    *_processing_info(_LLAVA, "LlavaProcessingInfo"),
    *_processor(_LLAVA, "LlavaMultiModalProcessor"),
    *_family_model(_LLAVA, "LlavaForConditionalGeneration", tower="LlavaImagePixelInputs"),
    *_attention(_CLIP, "CLIP"),
    VllmApi(_CLIP, "CLIPVisionEmbeddings.class_embedding"),
    *_attention(_SIGLIP, "Siglip"),
    # -- llava_next.py: LLaVA-NeXT (AnyRes) --
    *_processing_info(_LLAVA_NEXT, "LlavaNextProcessingInfo"),
    VllmApi(_LLAVA_NEXT, "LlavaNextProcessingInfo.get_vision_encoder_info"),
    VllmApi(
        _LLAVA_NEXT,
        "LlavaNextProcessingInfo._get_num_unpadded_features",
        ("original_height", "original_width", "npatches", "num_patch_height", "num_patch_width"),
    ),
    VllmApi("vllm.model_executor.models.vision", "VisionEncoderInfo.get_image_size"),
    VllmApi("vllm.model_executor.models.vision", "VisionEncoderInfo.get_patch_grid_length"),
    *_processor(_LLAVA_NEXT, "LlavaNextMultiModalProcessor"),
    VllmApi("vllm.multimodal.parse", "ImageProcessorItems"),
    VllmApi("vllm.multimodal.parse", "ImageProcessorItems.get_image_size", ("item_idx",)),
    VllmApi("vllm.multimodal.parse", "MultiModalDataItems.get_items", ("modality", "typ")),
    *_family_model(_LLAVA_NEXT, "LlavaNextForConditionalGeneration", tower="LlavaNextImagePixelInputs"),
    VllmApi(_LLAVA_NEXT, "LlavaNextImagePixelInputs.image_sizes"),
    VllmApi(_LLAVA_NEXT, "LlavaNextForConditionalGeneration.image_newline"),
    # The merge order the plug-in's anyres_layout reproduces (tested against it on 0.32).
    VllmApi(
        _LLAVA_NEXT,
        "LlavaNextForConditionalGeneration._merge_image_patch_embeddings",
        ("image_size", "patch_embeddings", "strategy"),
    ),
    # -- llava_onevision.py: LLaVA-OneVision (AnyRes through vLLM's own merge, SigLIP) --
    VllmApi(_ONEVISION, "LlavaOnevisionDummyInputsBuilder"),
    *_processing_info(_ONEVISION, "LlavaOnevisionProcessingInfo"),
    VllmApi(_ONEVISION, "LlavaOnevisionProcessingInfo.get_vision_encoder_info"),
    VllmApi(
        _ONEVISION,
        "LlavaOnevisionProcessingInfo._get_num_unpadded_features",
        ("original_height", "original_width", "npatches", "num_patch_height", "num_patch_width"),
    ),
    *_processor(_ONEVISION, "LlavaOnevisionMultiModalProcessor"),
    *_family_model(_ONEVISION, "LlavaOnevisionForConditionalGeneration", tower="LlavaOnevisionImagePixelInputs"),
    VllmApi(_ONEVISION, "LlavaOnevisionImagePixelInputs.image_sizes"),
    VllmApi(_ONEVISION, "LlavaOnevisionForConditionalGeneration.image_newline"),
    VllmApi(_ONEVISION, "LlavaOnevisionForConditionalGeneration._parse_and_validate_multimodal_inputs"),
    # Videos: every frame through the tower, then vLLM's own pooling of the tokens and the channels.
    VllmApi(_ONEVISION, "LlavaOnevisionVideoPixelInputs.pixel_values_videos"),
    VllmApi(_ONEVISION, "LlavaOnevisionForConditionalGeneration.apply_pooling", ("image_features",)),
    # The merge every per-token value goes through (a newline row given, interpolation inside).
    VllmApi(
        _ONEVISION,
        "LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings",
        ("image_size", "patch_embeddings", "image_newline", "strategy"),
    ),
    # -- llava_next_video.py: LLaVA-NeXT-Video (videos only, CLIP, the pooling resampler) --
    VllmApi(_NEXT_VIDEO, "LlavaNextVideoDummyInputsBuilder"),
    *_processing_info(_NEXT_VIDEO, "LlavaNextVideoProcessingInfo"),
    *_processor(_NEXT_VIDEO, "LlavaNextVideoMultiModalProcessor"),
    VllmApi(_NEXT_VIDEO, "LlavaNextVideoForConditionalGeneration"),
    VllmApi(_NEXT_VIDEO, "LlavaNextVideoForConditionalGeneration.__init__", ("vllm_config", "prefix")),
    *(
        VllmApi(_NEXT_VIDEO, f"LlavaNextVideoForConditionalGeneration.{name}")
        for name in (
            "config",
            "vision_tower",
            "vision_resampler",
            "multi_modal_projector",
            "get_language_model",
            "embed_multimodal",
            "_parse_and_validate_video_input",
        )
    ),
    VllmApi(_NEXT_VIDEO, "LlavaNextVideoForConditionalGeneration.load_weights", ("weights",)),
    VllmApi(_NEXT_VIDEO, "LlavaNextVideoPixelInputs.type"),
    VllmApi(_NEXT_VIDEO, "LlavaNextVideoPixelInputs.pixel_values_videos"),
    # -- internvl.py: InternVL in the HF format (vLLM's InternS1 class; tiles and frames flat) --
    VllmApi(_INTERNVL, "InternS1DummyInputsBuilder"),
    *_processing_info(_INTERNVL, "InternS1ProcessingInfo"),
    VllmApi(_INTERNVL, "InternS1ProcessingInfo.get_hf_processor"),
    VllmApi(_INTERNVL, "InternS1ProcessingInfo.get_tokenizer"),
    *_processor(_INTERNVL, "InternS1MultiModalProcessor"),
    VllmApi(_INTERNVL, "InternS1ForConditionalGeneration"),
    VllmApi(_INTERNVL, "InternS1ForConditionalGeneration.__init__", ("vllm_config", "prefix")),
    *(
        VllmApi(_INTERNVL, f"InternS1ForConditionalGeneration.{name}")
        for name in (
            "config",
            "vision_tower",
            "multi_modal_projector",
            "downsample_ratio",
            "get_language_model",
            "embed_multimodal",
            "_parse_and_validate_multimodal_inputs",
        )
    ),
    VllmApi(_INTERNVL, "InternS1ForConditionalGeneration.load_weights", ("weights",)),
    VllmApi(_INTERNVL, "InternS1ForConditionalGeneration.pixel_shuffle", ("x", "scale_factor")),
    *(VllmApi(_INTERNVL, f"InternS1ImagePixelInputs.{name}") for name in ("type", "pixel_values", "num_patches")),
    *(VllmApi(_INTERNVL, f"InternS1VideoPixelInputs.{name}") for name in ("type", "pixel_values", "num_patches")),
    VllmApi(_INTERNVIT, "InternS1VisionModel.encoder"),
    VllmApi(_INTERNVIT, "InternS1VisionModel.forward", ("pixel_values",)),
    VllmApi(_INTERNVIT, "InternS1VisionEncoder.layer"),
    VllmApi(_INTERNVIT, "InternS1VisionLayer.attention"),
    *(
        VllmApi(_INTERNVIT, f"InternSdpaAttention.{name}")
        for name in ("q_proj", "k_proj", "q_norm", "k_norm", "qk_normalization", "num_heads", "scale")
    ),
    VllmApi(_PROCESSING, "PromptUpdateDetails"),
    VllmApi(_PROCESSING, "PromptUpdateDetails.is_embed"),
    # -- idefics3.py: Idefics3 and SmolVLM (sub-images flat, one placeholder run each) --
    VllmApi(_IDEFICS3, "Idefics3DummyInputsBuilder"),
    *_processing_info(_IDEFICS3, "Idefics3ProcessingInfo"),
    *_processing_info(_SMOLVLM, "SmolVLMProcessingInfo"),
    VllmApi(_IDEFICS3, "Idefics3ProcessingInfo.get_hf_processor"),
    VllmApi(_IDEFICS3, "Idefics3ProcessingInfo.get_tokenizer"),
    VllmApi(
        _IDEFICS3,
        "Idefics3ProcessingInfo.get_image_repl",
        ("image_width", "image_height", "processor", "mm_kwargs"),
    ),
    *_processor(_IDEFICS3, "Idefics3MultiModalProcessor"),
    *_IDEFICS3_MODEL_APIS,
    *_as_subclasses(
        _IDEFICS3_MODEL_APIS, _SMOLVLM, {"Idefics3ForConditionalGeneration": "SmolVLMForConditionalGeneration"}
    ),
    *(
        VllmApi(_IDEFICS3, f"Idefics3ImagePixelInputs.{name}")
        for name in ("type", "pixel_values", "pixel_attention_mask", "num_patches")
    ),
    VllmApi(_IDEFICS3, "Idefics3Model.vision_model"),
    VllmApi(_IDEFICS3, "Idefics3Model.connector"),
    VllmApi(_IDEFICS3, "Idefics3Model.image_pixels_to_features", ("pixel_values", "pixel_attention_mask")),
    VllmApi(_IDEFICS3, "Idefics3Model.get_patch_attention_mask", ("pixel_attention_mask",)),
    VllmApi(_IDEFICS3, "Idefics3Connector.scale_factor"),
    VllmApi(_IDEFICS3, "Idefics3Connector.modality_projection"),
    VllmApi(_IDEFICS3, "Idefics3Connector.pixel_shuffle", ("x", "scale_factor")),
    VllmApi(_IDEFICS2_VISION, "Idefics2VisionTransformer.encoder"),
    VllmApi(_IDEFICS2_VISION, "Idefics2Encoder.layers"),
    VllmApi(_IDEFICS2_VISION, "Idefics2EncoderLayer.self_attn"),
    *(
        VllmApi(_IDEFICS2_VISION, f"Idefics2VisionAttention.{name}")
        for name in ("qkv_proj", "num_heads", "num_heads_per_partition", "scale")
    ),
    # -- qwen_vl.py: Qwen2-VL and Qwen2.5-VL --
    *_qwen_vl(_QWEN2, "Qwen2VL", "Qwen2Vision"),
    *_qwen_vl(_QWEN, "Qwen2_5_VL", "Qwen2_5_Vision"),
    VllmApi(_QWEN, "Qwen2_5_VisionTransformer.fullatt_block_indexes"),
    VllmApi(_QWEN, "Qwen2_5_VLVideoPixelInputs.second_per_grid_ts"),  # the t factor (Qwen2-VL's is 1)
    # -- qwen3_vl.py: Qwen3-VL, dense and MoE (Qwen2.5-VL's attention and image inputs, DeepStack) --
    *_QWEN3_APIS,
    *_as_subclasses(
        _QWEN3_APIS,
        _QWEN3_MOE,
        {
            "Qwen3VLForConditionalGeneration": "Qwen3VLMoeForConditionalGeneration",
            "Qwen3VLProcessingInfo": "Qwen3VLMoeProcessingInfo",
        },
    ),
    VllmApi("vllm.multimodal.inputs", "MultiModalFeatureSpec.mm_position"),
    VllmApi("vllm.multimodal.inputs", "MultiModalFeatureSpec.modality"),
    VllmApi("vllm.multimodal.inputs", "PlaceholderRange.offset"),
    VllmApi("vllm.multimodal.inputs", "PlaceholderRange.length"),
    VllmApi("vllm.multimodal.utils", "copy_mm_embedding_modality", ("src", "dst")),
    VllmApi("vllm.config.vllm", "VllmConfig.compilation_config"),
    VllmApi("vllm.config.vllm", "VllmConfig.parallel_config"),
    VllmApi("vllm.config.compilation", "CompilationConfig.compile_mm_encoder"),
    VllmApi("vllm.config.compilation", "CompilationConfig.cudagraph_mm_encoder"),
    VllmApi("vllm.config.parallel", "ParallelConfig.pipeline_parallel_size"),
    VllmApi("vllm.config.vllm", "VllmConfig.model_config"),
    VllmApi("vllm.config.model", "ModelConfig.multimodal_config"),
    VllmApi("vllm.config.multimodal", "MultiModalConfig.video_pruning_rate"),  # EVS, refused with flashvlm
    # Where the model runners call the overrides (V1: the CPU runner's base; V2: GPU's default).
    VllmApi(
        "vllm.v1.worker.gpu_model_runner", "GPUModelRunner._init_mrope_positions", calls=("get_mrope_input_positions",)
    ),
    VllmApi("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._execute_mm_encoder", calls=("embed_multimodal",)),
    VllmApi("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._preprocess", calls=("embed_input_ids",)),
    VllmApi("vllm.v1.worker.gpu.mm.rope", "RopeState.init_prefill_positions", calls=("get_mrope_input_positions",)),
    VllmApi("vllm.v1.worker.gpu.mm.encoder_runner", "EncoderRunner.execute_mm_encoder", calls=("embed_multimodal",)),
    VllmApi("vllm.v1.worker.gpu.mm.encoder_runner", "EncoderRunner.get_inputs_embeds", calls=("embed_input_ids",)),
)


# -- reading a source tree ------------------------------------------------------------------


@dataclass(frozen=True)
class Definition:
    """Where a name resolved to: a module, a class, a function, or an assignment."""

    kind: str  # "module", "class", "function", "value", "attribute" (set as self.X) or "external"
    module: str  # the vLLM module it is defined in
    node: ast.AST | None = None


def _bindings(body: list[ast.stmt]) -> tuple[dict[str, ast.stmt], list[ast.ImportFrom]]:
    """The names a module or class body binds, with the statement that binds each (the last
    binding wins, as at run time), and its ``from X import *`` statements. Module-level
    ``if``/``try``/``with`` blocks count (``TYPE_CHECKING`` imports, fallbacks)."""
    bound: dict[str, ast.stmt] = {}
    stars: list[ast.ImportFrom] = []
    for statement in body:
        if isinstance(statement, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            bound[statement.name] = statement
        elif isinstance(statement, ast.Assign):
            for target in statement.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        bound[name.id] = statement
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            bound[statement.target.id] = statement
        elif isinstance(statement, (ast.Import, ast.ImportFrom)):
            for alias in statement.names:
                if alias.name == "*":
                    stars.append(statement)
                else:
                    bound[alias.asname or alias.name.split(".")[0]] = statement
        elif isinstance(statement, (ast.If, ast.Try, ast.With)):
            blocks = [statement.body, getattr(statement, "orelse", [])]
            if isinstance(statement, ast.Try):
                blocks += [handler.body for handler in statement.handlers] + [statement.finalbody]
            for block in blocks:
                inner, inner_stars = _bindings(block)
                bound.update(inner)
                stars += inner_stars
    return bound, stars


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    arguments = function.args
    names = [argument.arg for argument in arguments.posonlyargs + arguments.args]
    if arguments.vararg or arguments.kwonlyargs:
        names.append("*" + (arguments.vararg.arg if arguments.vararg else ""))
    names += [argument.arg for argument in arguments.kwonlyargs]
    if arguments.kwarg:
        names.append("**" + arguments.kwarg.arg)
    return names


def _without_docstring(node: ast.AST) -> ast.AST:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        node = type(node)(**{field: getattr(node, field) for field in node._fields})
        node.body = body[1:] or [ast.Pass()]
    return node


class SourceTree:
    """A vLLM source tree (the ``vllm`` package folder or its parent), read but never imported."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        self.package = root / "vllm" if (root / "vllm" / "__init__.py").is_file() else root
        if not (self.package / "__init__.py").is_file():
            raise FileNotFoundError(f"{root} holds no vllm package (no __init__.py)")
        self._parsed: dict[str, tuple[ast.Module, bool] | None] = {}
        self._bound: dict[str, tuple[dict[str, ast.stmt], list[ast.ImportFrom]]] = {}

    @property
    def version(self) -> str | None:
        """``vllm/_version.py``'s ``__version__``, when the tree has one (wheels do)."""
        tree = self.parse("vllm._version")
        if tree is not None:
            statement = _bindings(tree[0].body)[0].get("__version__")
            if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant):
                return str(statement.value.value)
        return None

    def parse(self, module: str) -> tuple[ast.Module, bool] | None:
        """(syntax tree, is a package) of a ``vllm...`` module, or None when the tree lacks it."""
        if module not in self._parsed:
            parts = module.split(".")
            base = self.package.joinpath(*parts[1:])
            found = None
            for path, is_package in ((base / "__init__.py", True), (base.with_suffix(".py"), False)):
                if len(parts) > 1 or is_package:
                    if path.is_file():
                        found = (ast.parse(path.read_text(encoding="utf-8"), str(path)), is_package)
                        break
            self._parsed[module] = found
        return self._parsed[module]

    def _module_bindings(self, module: str) -> tuple[dict[str, ast.stmt], list[ast.ImportFrom]]:
        if module not in self._bound:
            parsed = self.parse(module)
            self._bound[module] = _bindings(parsed[0].body) if parsed else ({}, [])
        return self._bound[module]

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        _, is_package = self.parse(module)
        parts = module.split(".")
        package = parts if is_package else parts[:-1]
        base = package[: len(package) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def lookup(self, module: str, name: str, depth: int = 0) -> Definition | None:
        """What ``module.name`` is, following imports, re-exports and star imports inside vLLM."""
        if depth > 25 or self.parse(module) is None:
            return None
        bound, stars = self._module_bindings(module)
        statement = bound.get(name)
        if statement is None:
            if self.parse(f"{module}.{name}") is not None:
                return Definition("module", f"{module}.{name}")
            for star in stars:
                found = self.lookup(self._absolute(module, star), name, depth + 1)
                if found is not None:
                    return found
            return None
        if isinstance(statement, ast.ImportFrom):
            source = self._absolute(module, statement)
            alias = next(alias for alias in statement.names if (alias.asname or alias.name) == name)
            if source.split(".")[0] != "vllm":
                return Definition("external", source, statement)
            return self.lookup(source, alias.name, depth + 1)
        if isinstance(statement, ast.Import):
            alias = next(alias for alias in statement.names if (alias.asname or alias.name.split(".")[0]) == name)
            target = alias.name if alias.asname else alias.name.split(".")[0]
            if target.split(".")[0] == "vllm" and self.parse(target) is not None:
                return Definition("module", target)
            return Definition("external", target, statement)
        if isinstance(statement, ast.ClassDef):
            return Definition("class", module, statement)
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return Definition("function", module, statement)
        return Definition("value", module, statement)

    def evaluate(self, module: str, expression: ast.expr, depth: int = 0) -> Definition | None:
        """What a base-class or constructor expression (``Name``, ``a.b``, ``X[T]``) refers to."""
        if isinstance(expression, ast.Name):
            return self.lookup(module, expression.id, depth)
        if isinstance(expression, ast.Subscript):
            return self.evaluate(module, expression.value, depth)
        if isinstance(expression, ast.Attribute):
            owner = self.evaluate(module, expression.value, depth)
            if owner is None or owner.kind == "external":
                return None
            if owner.kind == "module":
                return self.lookup(owner.module, expression.attr, depth + 1)
            return self.member(owner, expression.attr, depth + 1)
        return None

    def as_class(self, definition: Definition, depth: int = 0) -> Definition | None:
        """The class itself, or the class of a module-level instance (``X = SomeClass(...)``)."""
        if definition.kind == "class":
            return definition
        node = definition.node
        if definition.kind == "value" and isinstance(getattr(node, "value", None), ast.Call):
            made = self.evaluate(definition.module, node.value.func, depth + 1)
            if made is not None and made.kind == "class":
                return made
        return None

    def member(self, owner: Definition, name: str, depth: int = 0) -> Definition | None:
        """A class's member: its own body, ``self.name = ...`` in its methods, then its bases."""
        cls = self.as_class(owner, depth)
        if cls is None or depth > 25:
            return None
        node: ast.ClassDef = cls.node  # type: ignore[assignment]
        statement = _bindings(node.body)[0].get(name)
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return Definition("function", cls.module, statement)
        if isinstance(statement, ast.ClassDef):
            return Definition("class", cls.module, statement)
        if statement is not None and not isinstance(statement, (ast.Import, ast.ImportFrom)):
            return Definition("value", cls.module, statement)
        for method in node.body:
            if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for assignment in ast.walk(method):
                    targets = (
                        assignment.targets
                        if isinstance(assignment, ast.Assign)
                        else [assignment.target]
                        if isinstance(assignment, ast.AnnAssign)
                        else []
                    )
                    for target in targets:
                        for attribute in ast.walk(target):
                            if (
                                isinstance(attribute, ast.Attribute)
                                and attribute.attr == name
                                and isinstance(attribute.value, ast.Name)
                                and attribute.value.id == "self"
                            ):
                                return Definition("attribute", cls.module, assignment)
        for base in node.bases:
            resolved = self.evaluate(cls.module, base, depth + 1)
            if resolved is not None and resolved.kind == "class":
                found = self.member(resolved, name, depth + 1)
                if found is not None:
                    return found
        return None

    def resolve(self, api: VllmApi) -> tuple[Definition | None, str]:
        """The definition of ``api``, or None with what was missing."""
        first, *rest = api.name.split(".")
        found = self.lookup(api.module, first)
        if found is None:
            where = "module not found" if self.parse(api.module) is None else f"no {first}"
            return None, where
        path = first
        for attribute in rest:
            if found.kind == "module":
                found = self.lookup(found.module, attribute)
            elif found.kind == "external":
                return None, f"{path} comes from outside vLLM ({found.module})"
            else:
                found = self.member(found, attribute)
            if found is None:
                return None, f"{path} has no {attribute}"
            path += f".{attribute}"
        return found, ""


# -- the check ---------------------------------------------------------------------------------


def _problems_of(api: VllmApi, definition: Definition) -> list[str]:
    node = definition.node
    problems = []
    if api.params is not None or api.calls is not None:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return [f"is not a function (a {definition.kind} in {definition.module})"]
    if api.params is not None:
        parameters = _parameters(node)
        plain = [parameter.lstrip("*") for parameter in parameters]  # ("" for a bare *)
        missing = [name for name in api.params if name not in plain]
        if missing:
            problems.append(f"no parameter {', '.join(missing)} (has {', '.join(parameters)})")
        else:
            places = [plain.index(name) for name in api.params]
            if places != sorted(places):
                problems.append(f"parameters not in the order {', '.join(api.params)} (has {', '.join(parameters)})")
    if api.value is not None:
        assigned = getattr(node, "value", None)
        if not (isinstance(assigned, ast.Constant) and assigned.value == api.value):
            shown = ast.unparse(assigned) if isinstance(assigned, ast.AST) else None
            problems.append(f"is {shown}, expected {api.value!r}")
    if api.calls is not None:
        called = {
            call.func.attr
            for call in ast.walk(node)
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
        }
        missing = [name for name in api.calls if name not in called]
        if missing:
            problems.append(f"no longer calls {', '.join(missing)}")
    return problems


def check_source_tree(root: str | Path, inventory: tuple[VllmApi, ...] = INVENTORY) -> list[str]:
    """One line per inventory entry the vLLM source tree at ``root`` does not satisfy."""
    tree = SourceTree(root)
    problems = []
    for api in inventory:
        definition, missing = tree.resolve(api)
        found = [missing] if definition is None else _problems_of(api, definition)
        problems += [f"{api.module}: {api.name}: {problem}" for problem in found]
    return problems


def _fingerprint(api: VllmApi, definition: Definition) -> str:
    """What of a definition matters to the plug-in, position- and docstring-free."""
    node = definition.node
    if api.calls is not None:  # how vLLM calls the overrides, not the rest of its function
        calls = [
            call
            for call in ast.walk(node)
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in api.calls
        ]
        return "\n".join(ast.dump(call) for call in calls)
    if isinstance(node, ast.ClassDef):  # its bases, not every method (those have their own entries)
        return ast.dump(ast.ClassDef(node.name, node.bases, node.keywords, [], node.decorator_list))
    return ast.dump(_without_docstring(node)) if node is not None else definition.module


def changed_definitions(
    reference: str | Path, target: str | Path, inventory: tuple[VllmApi, ...] = INVENTORY
) -> list[str]:
    """The definitions that differ between two trees (entries both resolve), one line each;
    entries that resolve to one definition (an inherited method) share its line."""
    old, new = SourceTree(reference), SourceTree(target)
    changed: dict[tuple[str, object], list[str]] = {}
    for api in inventory:
        (before, _), (after, _) = old.resolve(api), new.resolve(api)
        if before is None or after is None:
            continue
        line = getattr(after.node, "lineno", "?")
        if before.module != after.module:
            what = f"moved from {before.module} to {after.module}"
        elif _fingerprint(api, before) != _fingerprint(api, after):
            what = ("how it calls " + ", ".join(api.calls) if api.calls else "its definition") + " changed"
        else:
            continue
        where = f"{after.module.replace('.', '/')}.py:{line}"
        changed.setdefault((where, what), []).append(f"{api.module}: {api.name}")
    return [
        f"{names[0]}: {what} ({where})" + (f"; also as {', '.join(names[1:])}" if names[1:] else "")
        for (where, what), names in changed.items()
    ]


def unpack_sources(wheel: str | Path, destination: str | Path) -> int:
    """Extract the ``vllm/`` Python sources of a vLLM wheel (nothing else); the file count."""
    destination = Path(destination)
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.startswith("vllm/") and name.endswith(".py")]
        for name in names:
            archive.extract(name, destination)
    return len(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a vLLM source tree against the plug-in's vLLM APIs.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check a source tree (the vllm package or its parent folder)")
    check.add_argument("tree")
    check.add_argument("--reference", help="a second tree (the tested release) to list changed definitions against")
    unpack = commands.add_parser("unpack", help="extract a wheel's vllm/*.py files")
    unpack.add_argument("wheel")
    unpack.add_argument("destination")
    args = parser.parse_args(argv)
    if args.command == "unpack":
        print(f"{unpack_sources(args.wheel, args.destination)} vllm/*.py files from {Path(args.wheel).name}")
        return 0
    version = SourceTree(args.tree).version or "unknown version"
    problems = check_source_tree(args.tree)
    print(f"vLLM {version} at {args.tree}: {len(INVENTORY)} APIs checked, {len(problems)} problem(s)")
    for problem in problems:
        print(f"  {problem}")
    if args.reference:
        changed = changed_definitions(args.reference, args.tree)
        reference_version = SourceTree(args.reference).version or args.reference
        print(f"changed since vLLM {reference_version}: {len(changed)}")
        for line in changed:
            print(f"  {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
