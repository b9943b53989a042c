"""Gemma 3: SigLIP patches average-pooled into a fixed number of tokens, each image's tokens
attending to each other (bidirectional), between begin- and end-image tokens."""

from __future__ import annotations

from functools import partial

import torch

from . import TinyCase
from .shared import (
    IMAGE_TOKEN_ID,
    NO_CLS,
    PAD_TOKEN_ID,
    eval_model,
    left_pad,
    pixel_row,
    random_pixels,
    tiny_text_config,
    tiny_vision_config,
    word_level_tokenizer,
)

BEGIN_IMAGE_ID, END_IMAGE_ID = 123, 124
GEMMA3_TOKENS_PER_IMAGE = 16  # an 8 x 8 patch raster pooled 2 x 2 -> 4 x 4 tokens


def build_tiny_gemma3(seed: int = 0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    # One sliding-window layer (its window longer than any test prompt) and one global layer.
    text = tiny_text_config(
        Gemma3TextConfig,
        head_dim=12,
        query_pre_attn_scalar=12,
        sliding_window=256,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision = tiny_vision_config(SiglipVisionConfig, 32)
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
        boi_token_index=BEGIN_IMAGE_ID,
        eoi_token_index=END_IMAGE_ID,
        image_token_index=IMAGE_TOKEN_ID,
    )
    model = eval_model(Gemma3ForConditionalGeneration, config, seed)
    # The projection starts at zero (as the model initialises it), which would send every
    # image as identical tokens: give it random weights, as training would.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    return model


def gemma3_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    """A left-padded batch laid out as Gemma 3's processor does (begin-image token, the
    image's tokens, end-image token), one image per row, two in the last row, with the
    ``token_type_ids`` that make each image's tokens attend to each other."""
    generator = torch.Generator().manual_seed(seed)
    rows, images = [], 0
    image = [BEGIN_IMAGE_ID] + [IMAGE_TOKEN_ID] * GEMMA3_TOKENS_PER_IMAGE + [END_IMAGE_ID]
    for row in range(batch_size):
        text = torch.randint(3, BEGIN_IMAGE_ID, (4 + 3 * row,), generator=generator).tolist()
        count = 2 if row == batch_size - 1 and batch_size > 1 else 1
        rows.append([1] + text[: 1 + row] + image * count + text[1 + row :])
        images += count
    input_ids, attention_mask = left_pad(rows)
    token_type_ids = (input_ids == IMAGE_TOKEN_ID).long()
    pixels = random_pixels(images, seed)
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, pixel_values=pixels)


def tiny_gemma3_processor():
    """A Gemma3Processor over a word-level tokenizer whose image tokens have the tiny model's ids."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    special = {"<pad>": PAD_TOKEN_ID, "<bos>": 1, "<eos>": 2, "<start_of_turn>": 3, "<end_of_turn>": 4, "<unk>": 5}
    special.update(
        {"<start_of_image>": BEGIN_IMAGE_ID, "<end_of_image>": END_IMAGE_ID, "<image_soft_token>": IMAGE_TOKEN_ID}
    )
    words = "user model what is the color of shape a red green blue circle square how many are there".split()
    vocab = {**special, **{word: 6 + place for place, word in enumerate(words + list(":?.,"))}}
    tokenizer = word_level_tokenizer(
        vocab,
        special_tokens=list(special),
        bos="<bos>",
        eos="<eos>",
        prefix_bos=False,
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
        image_token="<image_soft_token>",
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=GEMMA3_TOKENS_PER_IMAGE
    )


CASES = [
    TinyCase(
        "gemma3",
        build_tiny_gemma3,
        gemma3_batch,
        GEMMA3_TOKENS_PER_IMAGE,
        partial(pixel_row, tokens_per_image=GEMMA3_TOKENS_PER_IMAGE),
        lacks=NO_CLS,
    ),
]
