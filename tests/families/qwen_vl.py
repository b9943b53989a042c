"""Qwen2-VL and Qwen2.5-VL: packed variable-size images and videos, 2 x 2 merged tokens, M-RoPE."""

from __future__ import annotations

from . import TinyCase
from .shared import (
    LLAVA_CHAT_TEMPLATE,
    NO_CLS,
    QWEN_PATCH,
    QWEN_TOKEN_IDS,
    eval_model,
    qwen_batch,
    qwen_row,
    tiny_text_config,
    tiny_tokenizer,
)


def qwen_text_config():
    from transformers import Qwen2VLTextConfig

    # mrope_section splits head_dim / 2 = 6 rotary frequencies among (t, h, w).
    rope = {"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0}
    return tiny_text_config(Qwen2VLTextConfig, rope_parameters=rope)


def build_tiny_qwen2_vl(seed: int = 0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=4, patch_size=QWEN_PATCH, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=qwen_text_config().to_dict(), vision_config=vision, **QWEN_TOKEN_IDS)
    return eval_model(Qwen2VLForConditionalGeneration, config, seed)


def build_tiny_qwen2_5_vl(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # Window attention in blocks 0 and 2 (2 x 2 merge groups per window), full attention in
    # block 1: saliency comes from block 1, in the tower's window order.
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=48,
        num_heads=4,
        patch_size=QWEN_PATCH,
        window_size=8,
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(text_config=qwen_text_config().to_dict(), vision_config=vision, **QWEN_TOKEN_IDS)
    return eval_model(Qwen2_5_VLForConditionalGeneration, config, seed)


def qwen_video_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    return qwen_batch(model, batch_size, seed, video=True)


def tiny_qwen_vl_processor(model_type: str = "qwen2_vl"):
    """Qwen2VLProcessor (or Qwen2_5_VLProcessor) as the real checkpoints' (a PIL image processor),
    built without its video processor as it must be here, LLaVA-1.5's chat format."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from flashvlm._torchvision_compat import without_video_processor

    processor_class = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}[model_type]
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 64, "longest_edge": 1024}
    )
    return without_video_processor(processor_class)(
        image_processor=image_processor, tokenizer=tiny_tokenizer(video_tokens=True), chat_template=LLAVA_CHAT_TEMPLATE
    )


def tiny_qwen2_5_vl_processor():
    return tiny_qwen_vl_processor("qwen2_5_vl")


CASES = [
    # Smallest image and frame: 4 x 6 patches -> 6 merged tokens.
    TinyCase("qwen2_vl", build_tiny_qwen2_vl, qwen_batch, 6, qwen_row, lacks=NO_CLS),
    TinyCase("qwen2_vl_video", build_tiny_qwen2_vl, qwen_video_batch, 6, qwen_row, video=True, lacks=NO_CLS),
    TinyCase("qwen2_5_vl", build_tiny_qwen2_5_vl, qwen_batch, 6, qwen_row, lacks=NO_CLS),
    TinyCase("qwen2_5_vl_video", build_tiny_qwen2_5_vl, qwen_video_batch, 6, qwen_row, video=True, lacks=NO_CLS),
]
