"""Idefics3 and SmolVLM: SigLIP on an image split into sub-images plus a global view, pixel
shuffle, row/column marker tokens around each sub-image's tokens."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from . import TinyCase
from .shared import (
    IMAGE_TOKEN_ID,
    NO_CLS,
    PAD_TOKEN_ID,
    TILE_SIZE,
    TILED_SPECIAL_TOKENS,
    TILED_VOCAB_SIZE,
    TOKENS_PER_TILE,
    VIDEO_TOKEN_ID,
    eval_model,
    fixed_id_tokenizer,
    image_processor_class,
    left_pad,
    tiny_text_config,
    tiny_vision_config,
    unpad_row,
)

FAKE_IMAGE_ID = TILED_SPECIAL_TOKENS["<fake_token_around_image>"]
GLOBAL_IMAGE_ID = TILED_SPECIAL_TOKENS["<global-img>"]
NEWLINE_ID = TILED_SPECIAL_TOKENS["\n"]
ROW_COL_IDS = {(row, col): TILED_SPECIAL_TOKENS[f"<row_{row}_col_{col}>"] for row in (1, 2) for col in (1, 2)}
#: (rows, cols) of the split of each image, one list per row of the batch, cycling:
#: a 1 x 2 split; an unsplit image; an unsplit image and a 2 x 2 split in one prompt.
IDEFICS3_SPLITS = [[(1, 2)], [(0, 0)], [(0, 0), (2, 2)]]


def build_tiny_idefics3(seed: int = 0, model_type: str = "idefics3", scale_factor: int = 2):
    """``scale_factor``: the pixel shuffle's (SmolVLM-256M/500M use 4, the 2.2B model 3)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3VisionConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMVisionConfig,
    )

    config_class, vision_class, model_class = {
        "idefics3": (Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration),
        "smolvlm": (SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration),
    }[model_type]
    vision = tiny_vision_config(vision_class, TILE_SIZE)
    config = config_class(
        vision_config=vision,
        text_config=tiny_text_config(LlamaConfig, vocab_size=TILED_VOCAB_SIZE),
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=scale_factor,
        pad_token_id=PAD_TOKEN_ID,
    )
    return eval_model(model_class, config, seed)


def build_tiny_smolvlm(seed: int = 0):
    return build_tiny_idefics3(seed, model_type="smolvlm")


def idefics3_image_prompt(rows: int, cols: int) -> list[int]:
    """One image's tokens as Idefics3Processor / SmolVLMProcessor write them."""
    image = [IMAGE_TOKEN_ID] * TOKENS_PER_TILE
    if rows == 0:
        return [FAKE_IMAGE_ID, GLOBAL_IMAGE_ID, *image, FAKE_IMAGE_ID]
    ids = []
    for row in range(1, rows + 1):
        for col in range(1, cols + 1):
            ids += [FAKE_IMAGE_ID, ROW_COL_IDS[row, col], *image]
        ids.append(NEWLINE_ID)
    return ids + [NEWLINE_ID, FAKE_IMAGE_ID, GLOBAL_IMAGE_ID, *image, FAKE_IMAGE_ID]


def idefics3_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    """pixel_values (B, S_max, 3, H, W): each row's sub-images (tiles row by row, then the global
    view, image after image), padded with all-zero images as the processor pads them."""
    generator = torch.Generator().manual_seed(seed)
    rows, sub_images = [], []
    for row in range(batch_size):
        text = torch.randint(3, VIDEO_TOKEN_ID, (4 + 2 * row,), generator=generator).tolist()
        ids = [1] + text[:2]
        count = 0
        for split_rows, split_cols in IDEFICS3_SPLITS[row % len(IDEFICS3_SPLITS)]:
            ids += idefics3_image_prompt(split_rows, split_cols)
            count += split_rows * split_cols + 1
        rows.append(ids + text[2:])
        sub_images.append(count)
    input_ids, attention_mask = left_pad(rows)
    pixel_values = torch.zeros(batch_size, max(sub_images), 3, TILE_SIZE, TILE_SIZE)
    pixel_attention_mask = torch.zeros(batch_size, max(sub_images), TILE_SIZE, TILE_SIZE, dtype=torch.bool)
    for row, count in enumerate(sub_images):
        pixel_values[row, :count] = torch.randn(count, 3, TILE_SIZE, TILE_SIZE, generator=generator)
        pixel_attention_mask[row, :count] = True
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        pixel_attention_mask=pixel_attention_mask,
    )


def idefics3_row(inputs: dict, row: int) -> dict:
    count = int(inputs["pixel_attention_mask"][row].flatten(1).any(dim=1).sum())
    return unpad_row(
        inputs,
        row,
        pixel_values=inputs["pixel_values"][row : row + 1, :count],
        pixel_attention_mask=inputs["pixel_attention_mask"][row : row + 1, :count],
    )


IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ ' ' + item['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def tiny_idefics3_processor(model_type: str = "idefics3"):
    """Idefics3Processor (or SmolVLMProcessor): images split into 32 px sub-images (at most
    2 x 2) plus the global view."""
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor, SmolVLMImageProcessorPil, SmolVLMProcessor

    image_processor_type, processor_class = {
        "idefics3": (Idefics3ImageProcessorPil, Idefics3Processor),
        "smolvlm": (SmolVLMImageProcessorPil, SmolVLMProcessor),
    }[model_type]
    tokenizer = fixed_id_tokenizer(
        image_token="<image>",
        fake_image_token="<fake_token_around_image>",
        global_image_token="<global-img>",
        end_of_utterance_token="<end_of_utterance>",
    )
    image_processor = image_processor_type(
        size={"longest_edge": 2 * TILE_SIZE}, max_image_size={"longest_edge": TILE_SIZE}
    )
    # SmolVLMProcessor requires a video processor argument: None, as flashvlm loads it without one.
    video = {"video_processor": None} if model_type == "smolvlm" else {}
    return image_processor_class(processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        **video,
        image_seq_len=TOKENS_PER_TILE,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )


def tiny_smolvlm_processor():
    return tiny_idefics3_processor("smolvlm")


CASES = [
    # Smallest unit: an unsplit image, 16 tokens; split images share one budget over all views.
    TinyCase("idefics3", build_tiny_idefics3, idefics3_batch, TOKENS_PER_TILE, idefics3_row, lacks=NO_CLS),
    TinyCase("smolvlm", build_tiny_smolvlm, idefics3_batch, TOKENS_PER_TILE, idefics3_row, lacks=NO_CLS),
]
