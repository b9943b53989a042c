"""The tiny random Qwen-VL models the vLLM tests serve: built from a config (Qwen2.5-VL: window
attention in blocks 0 and 2, full attention in block 1; Qwen2-VL: full attention in all 3
blocks; each with a 2-layer Qwen2 decoder with M-RoPE; Qwen3-VL: 3 blocks of full attention
whose blocks 0 and 1 feed DeepStack, a 2-layer Qwen3 decoder with interleaved M-RoPE, dense or
with 4 experts) and saved with a processor built locally (the tiny word-level tokenizer of
the other tests, Qwen2VLImageProcessorPil) and a chat template for the OpenAI server."""

from __future__ import annotations

import json

import numpy as np
import torch
from families.shared import tiny_tokenizer

IMAGE_TOKEN_ID, VISION_START_ID, VISION_END_ID = 127, 123, 124  # "<image>", "'", "-" in the tiny vocabulary
#: (width, height) in pixels: 2 x 2 pixel patches, 2 x 2 merge -> 8 x 8 and 6 x 10 merged tokens.
IMAGE_SIZES = ((32, 32), (40, 24))
QUESTIONS = ("what is the color of the shape ?", "how many red circle ?")
EOS_ID = 2
#: The chat path's prompt, as :func:`prompt` (and :func:`video_prompt`) writes it (vLLM's chat path adds no BOS).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} :{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %} ' <image> -{% elif item['type'] == 'video' %} ' <|video_pad|> -"
    "{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %} assistant :{% endif %}"
)


#: The families :func:`tiny_qwen_folder` builds.
FAMILIES = ("Qwen2.5-VL", "Qwen2-VL", "Qwen3-VL", "Qwen3-VL-MoE")


def tiny_qwen_folder(folder, family: str = "Qwen2.5-VL"):
    """A tiny Qwen-VL folder of ``family`` vLLM can load: config, random weights, processor."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,
    )

    from flashvlm._torchvision_compat import without_video_processor

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<|video_pad|>"], special_tokens=True)
    # head_dim 32 is one vLLM's CPU attention serves; mrope_section splits its 16 frequencies.
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
        initializer_range=0.2,  # peaked logits: greedy decoding is far from ties
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=0,
    )
    patches = dict(num_heads=4, patch_size=2, temporal_patch_size=2, spatial_merge_size=2, initializer_range=0.2)
    if family == "Qwen2.5-VL":
        vision = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            window_size=8,  # 2 x 2 merged tokens per window
            fullatt_block_indexes=[1],
            **patches,
        )
        config_class, model_class, processor_class = (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
        )
    elif family == "Qwen2-VL":
        # Qwen2-VL names the tower's width embed_dim and the merger's output hidden_size.
        vision = dict(depth=3, embed_dim=32, mlp_ratio=2, hidden_size=64, **patches)
        config_class, model_class, processor_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    elif family in ("Qwen3-VL", "Qwen3-VL-MoE"):
        # Interleaved M-RoPE over head_dim 32; DeepStack adds blocks 0 and 1 after decoder layers 0 and 1.
        text.update(head_dim=32, rope_parameters={**text["rope_parameters"], "mrope_interleaved": True})
        vision = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
            **patches,
        )
        config_class, model_class, processor_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        if family == "Qwen3-VL-MoE":
            # moe_intermediate_size 16: no expert matrix is square (see released_expert_layout).
            experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
            # vLLM reads norm_topk_prob, which the released configs carry (transformers' class always normalises).
            text.update(experts, norm_topk_prob=True)
            config_class, model_class = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    else:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model_class(config).eval().save_pretrained(folder)
    if family == "Qwen3-VL-MoE":
        released_expert_layout(folder / "model.safetensors")
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=2, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 64, "longest_edge": 1024}
    )
    without_video_processor(processor_class)(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        folder
    )
    # As a folder saved where torchvision is installed: vLLM's processor loads a video processor too.
    config_file = folder / "processor_config.json"
    processor_config = json.loads(config_file.read_text())
    video_processor_type = "Qwen3VLVideoProcessor" if family.startswith("Qwen3") else "Qwen2VLVideoProcessor"
    processor_config["video_processor"] = {
        "video_processor_type": video_processor_type,
        "merge_size": 2,
        "patch_size": 2,
        "temporal_patch_size": 2,
        # Small frames (at most 1024 pixels, 4 x 4 merged tokens), as few as the tests send.
        "size": {"shortest_edge": 256, "longest_edge": 1024},
        "min_pixels": 256,
        "max_pixels": 1024,
        "fps": 2,
        "min_frames": 2,
        "max_frames": 8,
        # vLLM normalises Qwen's pixels on the device with one mean and std for images and videos
        # (the image processor's), as the released checkpoints' processors share them.
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
    }
    config_file.write_text(json.dumps(processor_config))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


def released_expert_layout(path) -> None:
    """Qwen3-VL-MoE's expert weights as the released checkpoints (and vLLM) lay them out:
    ``gate_up_proj`` (E, H, 2I), ``down_proj`` (E, I, H). transformers keeps them transposed
    inside and saves them so; on load it transposes only when the shapes differ, hence no square
    expert matrix in the tiny model."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    for name in weights:
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            weights[name] = weights[name].transpose(1, 2).contiguous()
    save_file(weights, path, metadata={"format": "pt"})


def tiny_qwen(folder, family: str) -> dict:
    """:func:`tiny_qwen_folder` in ``folder``, and the transformers model and processor loaded from it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    tiny_qwen_folder(folder, family)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    return {"folder": folder, "model": model, "processor": AutoProcessor.from_pretrained(folder), "family": family}


def prompt(question: str, num_images: int = 1) -> str:
    return "user : " + "' <image> - " * num_images + question + " assistant :"


def video_prompt(question: str) -> str:
    return "user : ' <|video_pad|> - " + question + " assistant :"


def video_file(folder) -> str:
    """Four random 32 x 32 frames (two temporal groups of 8 x 8 merged tokens) as a ``.npy``."""
    frames = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    path = folder / "video.npy"
    np.save(path, frames)
    return str(path)


def image_files(folder) -> list[str]:
    from PIL import Image

    generator = np.random.default_rng(0)
    paths = []
    for index, (width, height) in enumerate(IMAGE_SIZES):
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / f"image{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths
