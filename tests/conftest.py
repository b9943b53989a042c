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


def placeholder_row(model, inputs: dict, row: int, tokens_per_image: int) -> dict:
    """Row ``row`` of a padded batch as the same prompt alone, for placeholder-token VLMs.

    Per-token tensors (B, L, ...) are cut to the row's real tokens; tensors with one entry
    per image (pixel_values, image_sizes, ...) keep the row's images, found from the
    image placeholder counts; other values pass through.
    """
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    images_per_row = ((input_ids == model.config.image_token_id).sum(dim=1) // tokens_per_image).tolist()
    first_image = sum(images_per_row[:row])
    real = attention_mask[row].bool()
    alone = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.shape[:2] == input_ids.shape:
            alone[name] = value[row : row + 1, real]
        elif isinstance(value, torch.Tensor) and value.shape[0] == sum(images_per_row):
            alone[name] = value[first_image : first_image + images_per_row[row]]
        else:
            alone[name] = value
    return alone


@dataclass
class TinyCase:
    """One model family for the test matrix."""

    name: str
    build: Callable[[], torch.nn.Module]  # a tiny random model, eval mode, fp32
    make_inputs: Callable[..., dict]  # (model, batch_size, seed) -> forward/generate kwargs
    tokens_per_image: int  # N: visual tokens one image yields
    #: (model, inputs, row, tokens_per_image) -> row ``row`` of ``inputs`` alone, unpadded.
    row_inputs: Callable[..., dict] = placeholder_row


TINY_CASES = [TinyCase("llava", build_tiny_llava, llava_batch, NUM_PATCHES)]


@pytest.fixture(scope="session", params=TINY_CASES, ids=lambda case: case.name)
def tiny_case(request) -> TinyCase:
    return request.param


#: LLaVA-1.5's conversation format, as a chat template.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_processor():
    """A LlavaProcessor with a word-level tokenizer over a small vocabulary (ids < 127)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    words = "user assistant what is the color of shape a an red green blue circle square triangle yes no how many".split()
    words += [f"w{i}" for i in range(IMAGE_TOKEN_ID - 4 - len(words) - 8)]
    words += list(":?.,!'-\n")
    vocab = {"<pad>": PAD_TOKEN_ID, "<s>": 1, "</s>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    vocab["<unk>"] = len(vocab)
    vocab["<image>"] = IMAGE_TOKEN_ID
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = None
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("<image>", "isolated"), pre_tokenizers.Whitespace()]
    )
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tiny_llava_folder(tmp_path_factory):
    """A tiny LLaVA saved as a Hugging Face folder: config, safetensors, tokenizer, processor."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    build_tiny_llava().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sample_image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "scene.png"
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (48, 48, 3), generator=generator, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path
