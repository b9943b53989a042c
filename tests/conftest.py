"""Tiny models built from configs (no download), and inputs for them, shared by the tests.

Each model family registers a :class:`TinyCase` in ``TINY_CASES``; the method x adapter
matrix runs over all of them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 127
PAD_TOKEN_ID = 0
VOCAB_SIZE = 128
IMAGE_SIZE = 32
PATCH_SIZE = 4
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64 visual tokens per image


def tiny_text_config(config_class, **overrides):
    """A 2-layer decoder config of ``config_class`` over the tiny vocabulary."""
    settings = dict(
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
    settings.update(overrides)
    return config_class(**settings)


def tiny_vision_config(config_class, image_size: int = IMAGE_SIZE, **overrides):
    """A 2-layer, 32-channel ViT config of ``config_class`` (CLIP, SigLIP, InternViT, ...) in
    patches of ``PATCH_SIZE``."""
    settings = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH_SIZE,
    )
    settings.update(overrides)
    return config_class(**settings)


def tiny_clip_config(image_size: int = IMAGE_SIZE) -> CLIPVisionConfig:
    return tiny_vision_config(CLIPVisionConfig, image_size, num_hidden_layers=3, projection_dim=32)


def tiny_llava_config(**overrides) -> LlavaConfig:
    vision = tiny_clip_config()
    text = tiny_text_config(LlamaConfig)
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


def unpad_row(inputs: dict, row: int, **visual) -> dict:
    """Row ``row`` of a padded batch on its own (padding removed), with its visual inputs."""
    real = inputs["attention_mask"][row].bool()
    single = {
        name: value[row][real][None]
        for name, value in inputs.items()
        if isinstance(value, torch.Tensor) and value.shape[:2] == inputs["input_ids"].shape
    }
    single.update(visual)
    return single


def llava_row(inputs: dict, row: int) -> dict:
    per_row = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1) // NUM_PATCHES
    first = int(per_row[:row].sum())
    return unpad_row(inputs, row, pixel_values=inputs["pixel_values"][first : first + int(per_row[row])])


@dataclass
class TinyCase:
    """One model family (and input modality) for the test matrix."""

    name: str
    build: Callable[[], torch.nn.Module]  # a tiny random model, eval mode, fp32
    make_inputs: Callable[..., dict]  # (model, batch_size, seed) -> left-padded forward/generate kwargs
    #: N: selectable visual tokens of the smallest budget unit the inputs hold (an image,
    #: or a video frame under the default per-frame video budget), so any budget below it
    #: prunes every unit.
    tokens_per_image: int
    select_row: Callable[[dict, int], dict] | None = None  # (batch, row) -> that row alone, unpadded
    video: bool = False  # the inputs hold videos
    #: Selection inputs (``flashvlm.selection.REQUIREMENTS``) this family cannot serve, from
    #: its architecture: a method needing one must raise MethodUnavailableError.
    lacks: frozenset[str] = frozenset()


TINY_CASES = [TinyCase("llava", build_tiny_llava, llava_batch, NUM_PATCHES, llava_row)]

_TINY_MODELS: dict[Callable[[], torch.nn.Module], torch.nn.Module] = {}


def tiny_model(case: TinyCase) -> torch.nn.Module:
    """One model per builder for the whole session, shared by every test file (the video
    cases share the image cases')."""
    if case.build not in _TINY_MODELS:
        _TINY_MODELS[case.build] = case.build()
    return _TINY_MODELS[case.build]


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

    words = (
        "user assistant what is the color of shape a an red green blue circle square triangle yes no how many".split()
    )
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


# -- LLaVA-NeXT and LLaVA-OneVision: AnyRes images (base view + crops + newline tokens) ------------
ANYRES_TILE = 24  # tower input side; patch 4 -> a 6 x 6 raster (36 tokens) per view
ANYRES_PINPOINTS = [[24, 48], [48, 24], [48, 48]]
#: (height, width) of the images, one per row, cycling: three different AnyRes layouts.
ANYRES_IMAGE_SIZES = [(30, 45), (45, 24), (48, 48)]
VIDEO_TOKEN_ID = 126
VIDEO_FRAMES = 3


def _eval_model(model_class, config, seed: int = 0):
    torch.manual_seed(seed)
    return model_class(config).eval()


def build_tiny_llava_next(seed: int = 0):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = tiny_clip_config(ANYRES_TILE)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=tiny_text_config(LlamaConfig),
        image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=ANYRES_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_TOKEN_ID,
    )
    return _eval_model(LlavaNextForConditionalGeneration, config, seed)


def build_tiny_llava_onevision(seed: int = 0):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = tiny_vision_config(SiglipVisionConfig, ANYRES_TILE)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=tiny_text_config(Qwen2Config),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        image_grid_pinpoints=ANYRES_PINPOINTS,
        # Shrinks crop rasters above ~1 view (the real models use anyres_max_9), so the
        # tiny model exercises the interpolation path.
        vision_aspect_ratio="anyres_max_1",
        pad_token_id=PAD_TOKEN_ID,
    )
    return _eval_model(LlavaOnevisionForConditionalGeneration, config, seed)


def _visual_lengths(model, inputs: dict) -> tuple[list[int], int]:
    """Placeholders each image needs, and each video (0 without videos), by asking the model."""
    core = model.model
    images = core.get_image_features(
        inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs.get("batch_num_images"), return_dict=True
    ).pooler_output
    video = 0
    if "pixel_values_videos" in inputs:
        video = core.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output.shape[1]
    return [tokens.shape[0] for tokens in images], video


def anyres_batch(model, batch_size: int = 2, seed: int = 0, video: bool = False) -> dict:
    """A left-padded batch: one AnyRes image per row (sizes cycle), in the middle of the text,
    and with ``video`` one video per row too."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [ANYRES_IMAGE_SIZES[row % len(ANYRES_IMAGE_SIZES)] for row in range(batch_size)]
    num_views = 1 + 4  # base + at most a 2 x 2 grid of crops
    inputs = dict(
        pixel_values=torch.randn(batch_size, num_views, 3, ANYRES_TILE, ANYRES_TILE, generator=generator),
        image_sizes=torch.tensor(sizes),
    )
    if video:
        inputs["pixel_values_videos"] = torch.randn(
            batch_size, VIDEO_FRAMES, 3, ANYRES_TILE, ANYRES_TILE, generator=generator
        )
    with torch.no_grad():
        image_lengths, video_length = _visual_lengths(model, inputs)
    rows = []
    for row in range(batch_size):
        text = torch.randint(3, VIDEO_TOKEN_ID, (5 + 2 * row,), generator=generator).tolist()
        ids = [1] + text[:2] + [IMAGE_TOKEN_ID] * image_lengths[row] + text[2:]
        if video:
            ids = ids[:2] + [VIDEO_TOKEN_ID] * video_length + ids[2:]
        rows.append(ids)
    input_ids, attention_mask = left_pad(rows)
    return dict(input_ids=input_ids, attention_mask=attention_mask, **inputs)


def anyres_video_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    return anyres_batch(model, batch_size, seed, video=True)


def anyres_row(inputs: dict, row: int) -> dict:
    visual = dict(pixel_values=inputs["pixel_values"][row : row + 1], image_sizes=inputs["image_sizes"][row : row + 1])
    if "pixel_values_videos" in inputs:
        visual["pixel_values_videos"] = inputs["pixel_values_videos"][row : row + 1]
    return unpad_row(inputs, row, **visual)


# -- Qwen2-VL and Qwen2.5-VL: packed variable-size images and videos, M-RoPE -----------------------
QWEN_PATCH = 2
QWEN_PIXELS_PER_PATCH = 3 * 2 * QWEN_PATCH * QWEN_PATCH  # channels x temporal patch x patch x patch
VISION_START_ID, VISION_END_ID = 123, 124
#: (height, width) in patches of the images of each row, cycling: several sizes, two images in one row.
QWEN_IMAGE_GRIDS = [[(8, 8)], [(4, 6), (6, 4)], [(6, 6)]]
#: (temporal, height, width) in patches of each row's video, cycling.
QWEN_VIDEO_GRIDS = [(2, 4, 6), (3, 6, 4)]


def _qwen_text_config():
    from transformers import Qwen2VLTextConfig

    # mrope_section splits head_dim / 2 = 6 rotary frequencies among (t, h, w).
    rope = {"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0}
    return tiny_text_config(Qwen2VLTextConfig, rope_parameters=rope)


_QWEN_TOKENS = dict(
    image_token_id=IMAGE_TOKEN_ID,
    video_token_id=VIDEO_TOKEN_ID,
    vision_start_token_id=VISION_START_ID,
    vision_end_token_id=VISION_END_ID,
    pad_token_id=PAD_TOKEN_ID,
)


def build_tiny_qwen2_vl(seed: int = 0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=4, patch_size=QWEN_PATCH, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=_qwen_text_config().to_dict(), vision_config=vision, **_QWEN_TOKENS)
    return _eval_model(Qwen2VLForConditionalGeneration, config, seed)


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
    config = Qwen2_5_VLConfig(text_config=_qwen_text_config().to_dict(), vision_config=vision, **_QWEN_TOKENS)
    return _eval_model(Qwen2_5_VLForConditionalGeneration, config, seed)


def qwen_batch(model, batch_size: int = 2, seed: int = 0, video: bool = False, timestamps: bool = False) -> dict:
    """A left-padded batch: images of different sizes (two in one row) amid the text, as the
    Qwen processor lays them out, and with ``video`` one video per row after the images
    (with ``timestamps``, as Qwen3-VL's processor does: a timestamp token, then each frame
    between its own vision start/end tokens)."""
    generator = torch.Generator().manual_seed(seed)
    rows, pixels, grids, video_pixels, video_grids = [], [], [], [], []
    for row in range(batch_size):
        text = torch.randint(3, VISION_START_ID, (4 + 2 * row,), generator=generator).tolist()
        ids = [1] + text[:2]
        for height, width in QWEN_IMAGE_GRIDS[row % len(QWEN_IMAGE_GRIDS)]:
            ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * (height * width // 4) + [VISION_END_ID]
            pixels.append(torch.randn(height * width, QWEN_PIXELS_PER_PATCH, generator=generator))
            grids.append([1, height, width])
        if video:
            frames, height, width = QWEN_VIDEO_GRIDS[row % len(QWEN_VIDEO_GRIDS)]
            if timestamps:
                frame = [VISION_START_ID] + [VIDEO_TOKEN_ID] * (height * width // 4) + [VISION_END_ID]
                ids += [t for second in range(frames) for t in [QWEN3_TIMESTAMP_IDS[second], *frame]]
            else:
                ids += [VISION_START_ID] + [VIDEO_TOKEN_ID] * (frames * height * width // 4) + [VISION_END_ID]
            video_pixels.append(torch.randn(frames * height * width, QWEN_PIXELS_PER_PATCH, generator=generator))
            video_grids.append([frames, height, width])
        rows.append(ids + text[2:])
    input_ids, attention_mask = left_pad(rows)
    token_types = (input_ids == IMAGE_TOKEN_ID).int() + 2 * (input_ids == VIDEO_TOKEN_ID).int()
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=token_types,
        pixel_values=torch.cat(pixels),
        image_grid_thw=torch.tensor(grids),
    )
    if video:
        inputs.update(pixel_values_videos=torch.cat(video_pixels), video_grid_thw=torch.tensor(video_grids))
    return inputs


def qwen_video_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    return qwen_batch(model, batch_size, seed, video=True)


# -- Qwen3-VL: Qwen's packed ViT with DeepStack features, timestamped video frames --------------------
#: Stand-ins for the "<0.5 seconds>" text Qwen3-VL's processor puts before each video frame.
QWEN3_TIMESTAMP_IDS = [120, 121, 122]


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
    config = Qwen3VLConfig(text_config=text.to_dict(), vision_config=vision, **_QWEN_TOKENS)
    return _eval_model(Qwen3VLForConditionalGeneration, config, seed)


def build_tiny_qwen3_vl_moe(seed: int = 0):
    """Qwen3-VL with a mixture-of-experts language model (4 experts, 2 per token)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeTextConfig

    dense = build_tiny_qwen3_vl(seed).config
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    text = tiny_text_config(
        Qwen3VLMoeTextConfig, head_dim=12, rope_parameters=dense.text_config.rope_parameters, **experts
    )
    vision = dense.vision_config.to_dict()
    config = Qwen3VLMoeConfig(text_config=text.to_dict(), vision_config=vision, **_QWEN_TOKENS)
    return _eval_model(Qwen3VLMoeForConditionalGeneration, config, seed)


def qwen3_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    return qwen_batch(model, batch_size, seed)


def qwen3_video_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    return qwen_batch(model, batch_size, seed, video=True, timestamps=True)


def qwen_row(inputs: dict, row: int) -> dict:
    from flashvlm.adapters.sequence import placeholder_rows

    visual = {}
    for token_id, pixels, grid in (
        (IMAGE_TOKEN_ID, "pixel_values", "image_grid_thw"),
        (VIDEO_TOKEN_ID, "pixel_values_videos", "video_grid_thw"),
    ):
        if pixels not in inputs:
            continue
        grids = inputs[grid]
        rows = placeholder_rows(inputs["input_ids"], token_id, (grids.prod(-1) // 4).tolist(), "item")
        mine = [item for item, item_row in enumerate(rows) if item_row == row]
        starts = torch.cat([torch.zeros(1, dtype=torch.long), grids.prod(-1).cumsum(0)])
        visual[pixels] = torch.cat([inputs[pixels][starts[item] : starts[item + 1]] for item in mine])
        visual[grid] = grids[mine]
    return unpad_row(inputs, row, **visual)


# -- Gemma 3: SigLIP patches average-pooled into a fixed number of tokens, bidirectional images ------
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
    model = _eval_model(Gemma3ForConditionalGeneration, config, seed)
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
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

    special = {"<pad>": PAD_TOKEN_ID, "<bos>": 1, "<eos>": 2, "<start_of_turn>": 3, "<end_of_turn>": 4, "<unk>": 5}
    special.update(
        {"<start_of_image>": BEGIN_IMAGE_ID, "<end_of_image>": END_IMAGE_ID, "<image_soft_token>": IMAGE_TOKEN_ID}
    )
    words = "user model what is the color of shape a red green blue circle square how many are there".split()
    vocab = {**special, **{word: 6 + place for place, word in enumerate(words + list(":?.,"))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(list(special))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=GEMMA3_TOKENS_PER_IMAGE
    )


def gemma3_row(inputs: dict, row: int) -> dict:
    per_row = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1) // GEMMA3_TOKENS_PER_IMAGE
    first = int(per_row[:row].sum())
    return unpad_row(inputs, row, pixel_values=inputs["pixel_values"][first : first + int(per_row[row])])


#: SigLIP and the Qwen ViT have no CLS token, hence no CLS attention row.
NO_CLS = frozenset({"cls_attention"})

TINY_CASES += [
    # Smallest image: (45, 24) -> 36 base + 72 unpadded crop tokens (newlines not counted).
    TinyCase("llava_next", build_tiny_llava_next, anyres_batch, 108, anyres_row),
    # Crop rasters are interpolated down to about one view: (30, 45) -> 36 base + 28 crop tokens.
    TinyCase("llava_onevision", build_tiny_llava_onevision, anyres_batch, 64, anyres_row, lacks=NO_CLS),
    # 6 x 6 raster pooled 2 x 2 -> 9 tokens per frame.
    TinyCase(
        "llava_onevision_video", build_tiny_llava_onevision, anyres_video_batch, 9, anyres_row, video=True, lacks=NO_CLS
    ),
    # Smallest image and frame: 4 x 6 patches -> 6 merged tokens.
    TinyCase("qwen2_vl", build_tiny_qwen2_vl, qwen_batch, 6, qwen_row, lacks=NO_CLS),
    TinyCase("qwen2_vl_video", build_tiny_qwen2_vl, qwen_video_batch, 6, qwen_row, video=True, lacks=NO_CLS),
    TinyCase("qwen2_5_vl", build_tiny_qwen2_5_vl, qwen_batch, 6, qwen_row, lacks=NO_CLS),
    TinyCase("qwen2_5_vl_video", build_tiny_qwen2_5_vl, qwen_video_batch, 6, qwen_row, video=True, lacks=NO_CLS),
    TinyCase("qwen3_vl", build_tiny_qwen3_vl, qwen3_batch, 6, qwen_row, lacks=NO_CLS),
    TinyCase("qwen3_vl_video", build_tiny_qwen3_vl, qwen3_video_batch, 6, qwen_row, video=True, lacks=NO_CLS),
    TinyCase("qwen3_vl_moe", build_tiny_qwen3_vl_moe, qwen3_batch, 6, qwen_row, lacks=NO_CLS),
    TinyCase("gemma3", build_tiny_gemma3, gemma3_batch, GEMMA3_TOKENS_PER_IMAGE, gemma3_row, lacks=NO_CLS),
]


def visual_token_ids(model) -> list[int]:
    """The placeholder ids of the visual tokens ``model`` takes (LLaVA-1.5 and -NeXT have no video token)."""
    video = getattr(model.config, "video_token_id", None)
    return [IMAGE_TOKEN_ID] + ([VIDEO_TOKEN_ID] if video is not None else [])


def visual_placeholders(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: where the visual placeholders are."""
    return torch.isin(input_ids, torch.tensor(visual_token_ids(model)))


def placeholder_counts(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B,) visual placeholders per row."""
    return visual_placeholders(model, input_ids).sum(dim=1)


def selectable_tokens_sent(model, pruned_kwargs: dict) -> torch.Tensor:
    """(B,) visual tokens each row of a pruned prompt sends that count against the budget.

    Every visual token but the LLaVA-NeXT/OneVision newline tokens, which travel outside the
    budget: they are told apart by their embedding (the model's ``image_newline``) in the
    encoder outputs the pruned arguments carry, placed at the placeholders in order.
    """
    input_ids = pruned_kwargs["input_ids"]
    newline = getattr(model.model, "image_newline", None)
    counts = torch.zeros(input_ids.shape[0], dtype=torch.long)
    for kind, token_id in zip(("image", "video"), visual_token_ids(model)):
        output = pruned_kwargs["mm_encoder_outputs"].get(kind)
        if output is None:
            continue
        tokens = torch.cat(list(output.pooler_output))  # (T, D) in placeholder order
        is_selectable = torch.ones(tokens.shape[0], dtype=torch.bool)
        if newline is not None:
            is_selectable = ~(tokens == newline).all(dim=-1)
        selectable = torch.zeros_like(input_ids, dtype=torch.bool)
        selectable[input_ids == token_id] = is_selectable
        counts += selectable.sum(dim=1)
    return counts


def kept_per_row(records, batch_size: int) -> torch.Tensor:
    """(B,) tokens the selection records say each row keeps."""
    kept = torch.zeros(batch_size, dtype=torch.long)
    for record in records:
        kept[record.batch_index] += record.num_kept
    return kept


# -- the vLLM plug-in's tests (tests/vllm_plugin/) ---------------------------------------------
# They run in the vLLM environment (`make vllm-test`) and are skipped wherever vLLM is not
# installed (the main environment, `make test`). Their hook and fixture live here rather than
# in a tests/vllm_plugin/conftest.py: a second module named `conftest` would replace this one in
# sys.modules, and every `from conftest import ...` made after it would find the wrong file.
VLLM_TESTS = Path(__file__).parent / "vllm_plugin"
_VLLM_SPEC = importlib.util.find_spec("vllm")
VLLM_INSTALLED = _VLLM_SPEC is not None and _VLLM_SPEC.origin is not None


def pytest_collection_modifyitems(config, items):
    if VLLM_INSTALLED:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed here: make vllm-test runs these in .venv-vllm")
    for item in items:
        if VLLM_TESTS in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_vllm_folder(tmp_path_factory) -> Path:
    from scene_llava import FOLDER

    from flashvlm.integrations.vllm.export import export_for_vllm

    return export_for_vllm(FOLDER, tmp_path_factory.mktemp("demo-vllm") / "model")


def pytest_terminal_summary(terminalreporter):
    """How many kept tokens differed between two paths on a near-tie (tests/agreement.py)."""
    from agreement import SWAPS

    if SWAPS:
        swapped = [entry for entry in SWAPS if entry[1]]
        total = sum(kept for _, _, kept in SWAPS)
        terminalreporter.write_line(
            f"cross-path selections: {len(SWAPS)} compared, {len(swapped)} with near-tie swaps "
            f"({sum(swaps for _, swaps, _ in swapped)} of {total} kept tokens)"
        )
        for label, swaps, kept in swapped:
            terminalreporter.write_line(f"  {label}: {swaps} of {kept} kept tokens swapped on a near-tie")
