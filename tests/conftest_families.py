"""Tiny InternVL, SmolVLM/Idefics3 and LLaVA-NeXT-Video models built from configs (no download),
inputs laid out as their processors lay them out, and the real processors of these families
and Qwen3-VL, built locally.

Imported by the tests of these families (``tests/conftest.py`` holds the older families).
Inputs are laid out by hand as the processors write them; the real InternVLProcessor,
Idefics3Processor, SmolVLMProcessor and Qwen3VLProcessor are built here (without
torchvision, minus their video processors, as flashvlm loads them) over word-level
tokenizers and PIL image processors, and checked to write the same layouts.
Every builder returns a random fp32 model in eval mode; every batch builder returns
left-padded ``forward``/``generate`` keyword arguments, several rows with different
prompts and visual layouts.
"""

from __future__ import annotations

import torch
from conftest import (
    ANYRES_PINPOINTS,
    ANYRES_TILE,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    QWEN_PATCH,
    TINY_CASES,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
    TinyCase,
    anyres_batch,
    anyres_row,
    left_pad,
    tiny_clip_config,
    tiny_text_config,
    tiny_vision_config,
    unpad_row,
)
from transformers import LlamaConfig, Qwen2Config

#: The new families' vocabulary: the shared one (ids < 128, image 127, video 126) plus
#: their own structural tokens at 128 and above.
FAMILY_VOCAB_SIZE = 160
TILE_SIZE = 32  # tower input side: patch 4 -> an 8 x 8 raster, 2 x 2 pixel shuffle -> 4 x 4 = 16 tokens
TOKENS_PER_TILE = 16

# -- InternVL (HF-native InternVL3/3.5): dynamic tiles + thumbnail, pixel shuffle -------------------
INTERNVL_START_ID, INTERNVL_END_ID = 128, 129  # <img>, </img> around each image's context tokens
#: Tiles per image, one list per row, cycling: 2 tiles + thumbnail; one tile; two images in a row.
INTERNVL_TILES = [[3], [1], [1, 3]]


def _eval_model(model_class, config, seed: int = 0):
    torch.manual_seed(seed)
    return model_class(config).eval()


def build_tiny_internvl(seed: int = 0, **vision_overrides):
    """``vision_overrides``: InternViT settings, e.g. ``use_qk_norm=True`` as InternViT-6B has."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    vision = tiny_vision_config(InternVLVisionConfig, TILE_SIZE, **vision_overrides)
    config = InternVLConfig(
        vision_config=vision,
        text_config=tiny_text_config(Qwen2Config, vocab_size=FAMILY_VOCAB_SIZE),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=TOKENS_PER_TILE,
        pad_token_id=PAD_TOKEN_ID,
    )
    return _eval_model(InternVLForConditionalGeneration, config, seed)


def internvl_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    """Rows of text with ``<img> context*16*tiles </img>`` blocks, as InternVLProcessor writes
    them; pixel_values hold every image's tiles (thumbnail last) in placeholder order."""
    generator = torch.Generator().manual_seed(seed)
    rows, tiles = [], []
    for row in range(batch_size):
        text = torch.randint(3, VIDEO_TOKEN_ID, (4 + 2 * row,), generator=generator).tolist()
        ids = [1] + text[:2]
        for count in INTERNVL_TILES[row % len(INTERNVL_TILES)]:
            ids += [INTERNVL_START_ID] + [IMAGE_TOKEN_ID] * (TOKENS_PER_TILE * count) + [INTERNVL_END_ID]
            tiles.append(count)
        rows.append(ids + text[2:])
    input_ids, attention_mask = left_pad(rows)
    pixel_values = torch.randn(sum(tiles), 3, TILE_SIZE, TILE_SIZE, generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


def internvl_row(inputs: dict, row: int) -> dict:
    """Row ``row`` alone: its tiles are the ones its placeholders count."""
    per_row = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1) // TOKENS_PER_TILE
    first = int(per_row[:row].sum())
    return unpad_row(inputs, row, pixel_values=inputs["pixel_values"][first : first + int(per_row[row])])


# -- SmolVLM / Idefics3: SigLIP on split sub-images, pixel shuffle, row/column markers -------------
FAKE_IMAGE_ID = 130  # <fake_token_around_image>
GLOBAL_IMAGE_ID = 131  # <global-img>
NEWLINE_ID = 132  # "\n"
ROW_COL_IDS = {(1, 1): 133, (1, 2): 134, (2, 1): 135, (2, 2): 136}  # <row_i_col_j>
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
        text_config=tiny_text_config(LlamaConfig, vocab_size=FAMILY_VOCAB_SIZE),
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=scale_factor,
        pad_token_id=PAD_TOKEN_ID,
    )
    return _eval_model(model_class, config, seed)


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


# -- LLaVA-NeXT-Video: AnyRes images as LLaVA-NeXT, videos pooled 2 x 2 per frame ------------------
def build_tiny_llava_next_video(seed: int = 0):
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    config = LlavaNextVideoConfig(
        vision_config=tiny_clip_config(ANYRES_TILE),
        text_config=tiny_text_config(LlamaConfig),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        image_grid_pinpoints=ANYRES_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        pad_token_id=PAD_TOKEN_ID,
    )
    return _eval_model(LlavaNextVideoForConditionalGeneration, config, seed)


def llava_next_video_batch(model, batch_size: int = 2, seed: int = 0) -> dict:
    """One AnyRes image and one video per row (the LLaVA-NeXT/OneVision layout)."""
    return anyres_batch(model, batch_size, seed, video=True)


# -- the families' real processors, over tokenizers and image processors built locally -------------
#: Structural tokens of the new families, at their fixed ids (matched before word splitting).
FAMILY_SPECIAL_TOKENS = {
    "<video>": VIDEO_TOKEN_ID,
    "<image>": IMAGE_TOKEN_ID,
    "<img>": INTERNVL_START_ID,
    "</img>": INTERNVL_END_ID,
    "<fake_token_around_image>": FAKE_IMAGE_ID,
    "<global-img>": GLOBAL_IMAGE_ID,
    "\n": NEWLINE_ID,
    **{f"<row_{row}_col_{col}>": token_id for (row, col), token_id in ROW_COL_IDS.items()},
    "<|im_start|>": 137,
    "<|im_end|>": 138,
    "<end_of_utterance>": 139,
}


def family_tokenizer(
    special_tokens: dict[str, int] = FAMILY_SPECIAL_TOKENS, vocab_size: int = FAMILY_VOCAB_SIZE, **named_tokens: str
):
    """A fast word-level tokenizer: ids 0-3 are pad, <s>, </s>, <unk>; words on the free ids
    below 126; ``special_tokens`` at their ids. ``named_tokens`` become attributes
    (``image_token="<image>"``)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "user assistant what is the color of shape a an red green blue circle yes no how many".split()
    words += list(":?.,!")
    vocab = {"<pad>": PAD_TOKEN_ID, "<s>": 1, "</s>": 2, "<unk>": 3, **special_tokens}
    free_ids = [token_id for token_id in range(4, VIDEO_TOKEN_ID) if token_id not in vocab.values()]
    for word, token_id in zip(words + [f"w{i}" for i in range(VIDEO_TOKEN_ID)], free_ids):
        vocab[word] = token_id
    for filler in sorted(set(range(vocab_size)) - set(vocab.values())):
        vocab[f"<unused{filler}>"] = filler
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special_tokens])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens=named_tokens,
    )


def image_processor_class(processor_class: type) -> type:
    """The real processor class as flashvlm loads it here: without torchvision, minus its video
    processor (flashvlm._torchvision_compat), which only refuses videos."""
    from flashvlm._torchvision_compat import needs_torchvision, without_video_processor

    return without_video_processor(processor_class) if needs_torchvision(processor_class) else processor_class


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
    tokenizer = family_tokenizer(
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


#: InternVL3's and Qwen3-VL's chat format (ChatML), each with its own image placeholder.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ image_placeholder }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_internvl_processor():
    """InternVLProcessor: 32 px tiles, up to 4 of them plus the thumbnail for a large image."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    tokenizer = family_tokenizer(
        start_image_token="<img>", end_image_token="</img>", context_image_token="<image>", video_token="<video>"
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE_SIZE, "width": TILE_SIZE}, crop_to_patches=True, max_patches=4
    )
    return image_processor_class(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=TOKENS_PER_TILE,
        chat_template=CHATML_TEMPLATE.replace("{{ image_placeholder }}", "<image>\n"),
    )


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

    tokenizer = family_tokenizer(
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


#: SigLIP has no CLS token (InternViT and CLIP have one).
NO_CLS = frozenset({"cls_attention"})

FAMILY_CASES = [
    # Smallest unit: a one-tile image, 4 x 4 tokens after the pixel shuffle; each tile of a
    # split image is such a raster for grid-based methods.
    TinyCase("internvl", build_tiny_internvl, internvl_batch, TOKENS_PER_TILE, internvl_row),
    # Smallest unit: an unsplit image, 16 tokens; split images share one budget over all views.
    TinyCase("idefics3", build_tiny_idefics3, idefics3_batch, TOKENS_PER_TILE, idefics3_row, lacks=NO_CLS),
    TinyCase("smolvlm", build_tiny_smolvlm, idefics3_batch, TOKENS_PER_TILE, idefics3_row, lacks=NO_CLS),
    # AnyRes images as LLaVA-NeXT, and a video per row: 6 x 6 pooled 2 x 2 -> 9 tokens per frame.
    TinyCase("llava_next_video", build_tiny_llava_next_video, llava_next_video_batch, 9, anyres_row, video=True),
]

#: Every tiny family: those of conftest.py, then these. The contract tests, the method x
#: family matrix and the catalog check run over all of them.
EVERY_CASE = [*TINY_CASES, *FAMILY_CASES]
