"""What several families share: the tiny vocabulary and its tokenizers, config builders, the
AnyRes and packed Qwen input layouts, chat templates, and checks on pruned prompts."""

from __future__ import annotations

import copy

import torch
from transformers import CLIPVisionConfig

VOCAB_SIZE = 128
PAD_TOKEN_ID = 0
IMAGE_TOKEN_ID = 127
VIDEO_TOKEN_ID = 126
IMAGE_SIZE = 32
PATCH_SIZE = 4

#: SigLIP and the Qwen ViT have no CLS token, hence no CLS attention row.
NO_CLS = frozenset({"cls_attention"})


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


def served_text_config(config_class, **overrides):
    """:func:`tiny_text_config` as vLLM serves it on a CPU: heads of 32 channels (its CPU
    attention takes head sizes from 32 up), and peaked logits (``initializer_range`` 0.2), so
    that greedy decoding is far from ties on any CPU."""
    settings = dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2
    )
    return tiny_text_config(config_class, **{**settings, **overrides})


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


def eval_model(model_class, config, seed: int = 0):
    """A random fp32 ``model_class`` in eval mode, the same for the same seed."""
    torch.manual_seed(seed)
    return model_class(config).eval()


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


def pixel_row(inputs: dict, row: int, tokens_per_image: int) -> dict:
    """Row ``row`` alone, with the ``pixel_values`` of its images (or tiles): one per
    ``tokens_per_image`` placeholders, in placeholder order."""
    per_row = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1) // tokens_per_image
    first = int(per_row[:row].sum())
    return unpad_row(inputs, row, pixel_values=inputs["pixel_values"][first : first + int(per_row[row])])


# -- AnyRes images (base view + crops + newline tokens): LLaVA-NeXT, -OneVision, -NeXT-Video --------
ANYRES_TILE = 24  # tower input side; patch 4 -> a 6 x 6 raster (36 tokens) per view
ANYRES_PINPOINTS = [[24, 48], [48, 24], [48, 48]]
#: (height, width) of the images, one per row, cycling: three different AnyRes layouts.
ANYRES_IMAGE_SIZES = [(30, 45), (45, 24), (48, 48)]
VIDEO_FRAMES = 3


def anyres_lengths(model, inputs: dict) -> tuple[list[int], int]:
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
        image_lengths, video_length = anyres_lengths(model, inputs)
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
    """One AnyRes image and one video per row."""
    return anyres_batch(model, batch_size, seed, video=True)


def anyres_row(inputs: dict, row: int) -> dict:
    visual = dict(pixel_values=inputs["pixel_values"][row : row + 1], image_sizes=inputs["image_sizes"][row : row + 1])
    if "pixel_values_videos" in inputs:
        visual["pixel_values_videos"] = inputs["pixel_values_videos"][row : row + 1]
    return unpad_row(inputs, row, **visual)


# -- Qwen's packed variable-size images and videos: Qwen2-VL, Qwen2.5-VL, Qwen3-VL ------------------
QWEN_PATCH = 2
QWEN_PIXELS_PER_PATCH = 3 * 2 * QWEN_PATCH * QWEN_PATCH  # channels x temporal patch x patch x patch
VISION_START_ID, VISION_END_ID = 123, 124
#: (height, width) in patches of the images of each row, cycling: several sizes, two images in one row.
QWEN_IMAGE_GRIDS = [[(8, 8)], [(4, 6), (6, 4)], [(6, 6)]]
#: (temporal, height, width) in patches of each row's video, cycling.
QWEN_VIDEO_GRIDS = [(2, 4, 6), (3, 6, 4)]
#: Stand-ins for the "<0.5 seconds>" text Qwen3-VL's processor puts before each video frame.
QWEN3_TIMESTAMP_IDS = [120, 121, 122]
#: The token ids of every tiny Qwen model's config.
QWEN_TOKEN_IDS = dict(
    image_token_id=IMAGE_TOKEN_ID,
    video_token_id=VIDEO_TOKEN_ID,
    vision_start_token_id=VISION_START_ID,
    vision_end_token_id=VISION_END_ID,
    pad_token_id=PAD_TOKEN_ID,
)


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


# -- tiles of InternVL and sub-images of Idefics3/SmolVLM, over a vocabulary of 160 ids ------------
TILE_SIZE = 32  # tower input side: patch 4 -> an 8 x 8 raster, 2 x 2 pixel shuffle -> 4 x 4 = 16 tokens
TOKENS_PER_TILE = 16
#: The shared vocabulary (ids < 128, image 127, video 126) plus the structural tokens of
#: InternVL and Idefics3 at 128 and above, one tokenizer for both so that each finds its own.
TILED_VOCAB_SIZE = 160
TILED_SPECIAL_TOKENS = {
    "<video>": VIDEO_TOKEN_ID,
    "<image>": IMAGE_TOKEN_ID,
    "<img>": 128,
    "</img>": 129,
    "<fake_token_around_image>": 130,
    "<global-img>": 131,
    "\n": 132,
    "<row_1_col_1>": 133,
    "<row_1_col_2>": 134,
    "<row_2_col_1>": 135,
    "<row_2_col_2>": 136,
    "<|im_start|>": 137,
    "<|im_end|>": 138,
    "<end_of_utterance>": 139,
}


# -- tokenizers and chat templates -----------------------------------------------------------------
def word_level_tokenizer(
    vocab: dict[str, int],
    *,
    special_tokens=(),
    isolated=(),
    bos: str = "<s>",
    eos: str = "</s>",
    prefix_bos: bool = True,
    **named_tokens: str,
):
    """A fast, left-padding tokenizer splitting on whitespace and punctuation into the words of
    ``vocab``. ``special_tokens`` are matched before splitting, ``isolated`` ones are split out
    as words; with ``prefix_bos`` every text starts with ``bos``. ``named_tokens`` become
    attributes (``image_token="<image>"``)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words = pre_tokenizers.Whitespace()
    splits = [pre_tokenizers.Split(token, "isolated") for token in isolated]
    core.pre_tokenizer = pre_tokenizers.Sequence([*splits, words]) if splits else words
    core.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special_tokens])
    if prefix_bos:
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens=named_tokens,
    )


def tiny_tokenizer(video_tokens: bool = False):
    """The tokenizer of the shared vocabulary (ids < 127, ``<image>`` 127): pad, <s>, </s>, then
    words; ``<unk>`` takes the video id. ``video_tokens`` adds ``<video>`` and ``<|video_pad|>``
    above the vocabulary, so that no prompt word maps to a video token."""
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
    tokenizer = word_level_tokenizer(vocab, isolated=["<image>"], image_token="<image>")
    if video_tokens:
        tokenizer.add_tokens(["<video>", "<|video_pad|>"], special_tokens=True)
    return tokenizer


def fixed_id_tokenizer(
    special_tokens: dict[str, int] = TILED_SPECIAL_TOKENS, vocab_size: int = TILED_VOCAB_SIZE, **named_tokens: str
):
    """A word-level tokenizer with ``special_tokens`` at their ids: ids 0-3 are pad, <s>, </s>,
    <unk>; words on the free ids below 126, unused fillers up to ``vocab_size``."""
    words = "user assistant what is the color of shape a an red green blue circle yes no how many".split()
    words += list(":?.,!")
    vocab = {"<pad>": PAD_TOKEN_ID, "<s>": 1, "</s>": 2, "<unk>": 3, **special_tokens}
    free_ids = [token_id for token_id in range(4, VIDEO_TOKEN_ID) if token_id not in vocab.values()]
    for word, token_id in zip(words + [f"w{i}" for i in range(VIDEO_TOKEN_ID)], free_ids):
        vocab[word] = token_id
    for filler in sorted(set(range(vocab_size)) - set(vocab.values())):
        vocab[f"<unused{filler}>"] = filler
    return word_level_tokenizer(vocab, special_tokens=list(special_tokens), **named_tokens)


def image_processor_class(processor_class: type) -> type:
    """The real processor class as flashvlm loads it here: without torchvision, minus its video
    processor (flashvlm._torchvision_compat), which only refuses videos."""
    from flashvlm._torchvision_compat import needs_torchvision, without_video_processor

    return without_video_processor(processor_class) if needs_torchvision(processor_class) else processor_class


#: LLaVA-1.5's conversation format, as a chat template.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: InternVL3's and Qwen3-VL's chat format (ChatML), each with its own image placeholder.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ image_placeholder }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# -- checks on pruned prompts ----------------------------------------------------------------------
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


def reference_attention(tower, pixel_values, layer: int, **tower_kwargs) -> torch.Tensor:
    """(P, H, S, S) post-softmax attention of one tower layer, from an eager copy's own maps."""
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        return eager(pixel_values, output_attentions=True, **tower_kwargs).attentions[layer]
