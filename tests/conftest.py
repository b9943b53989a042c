"""Tiny models built from configs (no download), and inputs for them, shared by the tests.

Each model family registers a :class:`TinyCase` in ``TINY_CASES``; the method x adapter
matrix runs over all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 127
PAD_TOKEN_ID = 0
VOCAB_SIZE = 128
IMAGE_SIZE = 32
PATCH_SIZE = 4
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64 visual tokens per image


def tiny_llava_config(**overrides) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_TOKEN_ID,
    )
    settings.update(overrides)
    return LlavaConfig(**settings)


def build_tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**overrides))
    model.set_attn_implementation(attn_implementation)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llava() -> LlavaForConditionalGeneration:
    return build_tiny_llava()


def llava_prompt(text_ids: list[int], images: int = 1, image_at: int = 1) -> list[int]:
    """BOS, then text with ``images`` blocks of placeholders inserted after ``image_at`` text tokens."""
    ids = [1] + text_ids[:image_at]
    for _ in range(images):
        ids += [IMAGE_TOKEN_ID] * NUM_PATCHES
    return ids + text_ids[image_at:]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def random_pixels(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def llava_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    """A left-padded batch of different prompts, one image per row (the last row has two)."""
    generator = torch.Generator().manual_seed(seed)
    rows, images = [], 0
    for row in range(batch_size):
        text = torch.randint(3, IMAGE_TOKEN_ID, (4 + 3 * row,), generator=generator).tolist()
        count = 2 if row == batch_size - 1 and batch_size > 1 else 1
        rows.append(llava_prompt(text, images=count, image_at=1 + row))
        images += count
    input_ids, attention_mask = left_pad(rows)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(images, seed))


@dataclass
class TinyCase:
    """One model family for the test matrix."""

    name: str
    build: Callable[[], torch.nn.Module]  # a tiny random model, eval mode, fp32
    make_inputs: Callable[..., dict]  # (model, batch_size, seed) -> forward/generate kwargs
    tokens_per_image: int  # N: visual tokens one image yields


TINY_CASES = [TinyCase("llava", build_tiny_llava, llava_batch, NUM_PATCHES)]


@pytest.fixture(scope="session", params=TINY_CASES, ids=lambda case: case.name)
def tiny_case(request) -> TinyCase:
    return request.param
