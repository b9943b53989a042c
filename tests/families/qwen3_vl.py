"""Qwen3-VL, dense and mixture-of-experts: Qwen's packed ViT with DeepStack features, and
timestamped video frames."""

from __future__ import annotations

from . import TinyCase
from .shared import (
    CHATML_TEMPLATE,
    IMAGE_TOKEN_ID,
    NO_CLS,
    QWEN_PATCH,
    QWEN_TOKEN_IDS,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
    eval_model,
    fixed_id_tokenizer,
    image_processor_class,
    qwen_batch,
    qwen_row,
    tiny_text_config,
)


def build_tiny_qwen3_vl(seed: int = 0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLTextConfig

    rope = {"rope_type": "default", "mrope_section": [2, 2, 2], "mrope_interleaved": True, "rope_theta": 10000.0}
    text = tiny_text_config(Qwen3VLTextConfig, head_dim=12, rope_parameters=rope)
    # DeepStack: the outputs of blocks 0 and 1 are merged and added after LM layers 1 and 2.
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=QWEN_PATCH,
        out_hidden_size=48,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
    )
    config = Qwen3VLConfig(text_config=text.to_dict(), vision_config=vision, **QWEN_TOKEN_IDS)
    return eval_model(Qwen3VLForConditionalGeneration, config, seed)


def build_tiny_qwen3_vl_moe(seed: int = 0):
    """Qwen3-VL with a mixture-of-experts language model (4 experts, 2 per token)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeTextConfig

    dense = build_tiny_qwen3_vl(seed).config
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    text = tiny_text_config(
        Qwen3VLMoeTextConfig, head_dim=12, rope_parameters=dense.text_config.rope_parameters, **experts
    )
    vision = dense.vision_config.to_dict()
    config = Qwen3VLMoeConfig(text_config=text.to_dict(), vision_config=vision, **QWEN_TOKEN_IDS)
    return eval_model(Qwen3VLMoeForConditionalGeneration, config, seed)


def qwen3_video_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    return qwen_batch(model, batch_size, seed, video=True, timestamps=True)


#: Qwen3-VL's vocabulary is the shared one (128 ids): its chat tokens sit below the
#: vision start/end tokens, where the tiny Qwen models have them.
QWEN3_SPECIAL_TOKENS = {
    "<video>": VIDEO_TOKEN_ID,
    "<image>": IMAGE_TOKEN_ID,
    "<|vision_start|>": VISION_START_ID,
    "<|vision_end|>": VISION_END_ID,
    "\n": 119,
    "<|im_start|>": 120,
    "<|im_end|>": 121,
}


def tiny_qwen3_vl_processor():
    """Qwen3VLProcessor: 2 px patches merged 2 x 2, images resized to between 16 x 16 and 32 x 32 pixels."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

    tokenizer = fixed_id_tokenizer(
        QWEN3_SPECIAL_TOKENS,
        VOCAB_SIZE,
        image_token="<image>",
        video_token="<video>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32},
    )
    return image_processor_class(Qwen3VLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHATML_TEMPLATE.replace("{{ image_placeholder }}", "<|vision_start|><image><|vision_end|>"),
    )


CASES = [
    TinyCase("qwen3_vl", build_tiny_qwen3_vl, qwen_batch, 6, qwen_row, lacks=NO_CLS),
    TinyCase("qwen3_vl_video", build_tiny_qwen3_vl, qwen3_video_batch, 6, qwen_row, video=True, lacks=NO_CLS),
    TinyCase("qwen3_vl_moe", build_tiny_qwen3_vl_moe, qwen_batch, 6, qwen_row, lacks=NO_CLS),
]
