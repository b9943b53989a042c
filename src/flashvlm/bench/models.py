"""Models to benchmark: the shipped configs of real VLMs, built with random weights.

Random weights time the same as trained ones, so a benchmark needs only the config.
``--scale`` shrinks a config for a CPU (fewer layers, narrower layers); every scaled
dimension is reported next to the real one, so a scaled run is never mistaken for
the real shape. Token counts (image size, patch size) are never scaled.

Each model family (``model_type``) has a :class:`Family`: how to build synthetic
inputs with the right number of image placeholders, and the analytic FLOPs of its
vision side (see :mod:`flashvlm.bench.flops`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..errors import FlashVLMError
from . import flops

#: Short names of the configs shipped in ``flashvlm/bench/configs``.
SHIPPED_CONFIGS = (
    "llava-1.5-7b",
    "llava-1.5-13b",
    "llava-next-7b",
    "qwen2.5-vl-7b",
    "qwen3-vl-8b",
    "gemma-3-4b",
    "gemma-3-12b",
    "internvl3-8b",
    "internvl3.5-8b",
    "smolvlm2-2.2b",
    "llava-next-video-7b",
)

#: ``--scale`` keys and what they shrink.
SCALE_KEYS = {
    "lm_layers": "decoder layers of the language model",
    "vision_layers": "encoder layers of the vision tower",
    "width": "fraction of every hidden/intermediate size (head size kept, heads scaled)",
}

#: Named scales: ``--scale cpu`` is what the CPU figures in docs/performance.md use.
SCALE_PRESETS = {
    "full": {},
    "cpu": {"lm_layers": 4, "vision_layers": 6, "width": 0.25},
    "tiny": {"lm_layers": 1, "vision_layers": 2, "width": 0.0625},
}


def load_config(name_or_path: str):
    """A transformers config from a shipped short name, a config.json, or a model folder."""
    if name_or_path in SHIPPED_CONFIGS:
        text = resources.files("flashvlm.bench").joinpath("configs", f"{name_or_path}.json").read_text()
        source = f"shipped config {name_or_path}"
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FlashVLMError(
                f"--model {name_or_path!r} is neither a shipped config ({', '.join(SHIPPED_CONFIGS)}) "
                "nor a config.json / model folder"
            )
        text = path.read_text()
        source = str(path)
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise FlashVLMError(f"{source} is not valid JSON: {error}") from None
    from transformers import CONFIG_MAPPING

    for note in ("_source", "_unsure"):  # where the values come from, and which are not certain
        settings.pop(note, None)
    model_type = settings.get("model_type")
    if model_type not in FAMILIES:
        raise FlashVLMError(
            f"{source} has model_type {model_type!r}; the benchmark knows {', '.join(sorted(FAMILIES))}"
        )
    return CONFIG_MAPPING[model_type].from_dict(settings)


def parse_scale(items: list[str] | None) -> dict[str, float]:
    """``["cpu"]`` or ``["lm_layers=4", "width=0.25"]`` -> {key: value}; [] or None -> full size."""
    scale: dict[str, float] = {}
    for item in items or []:
        if item in SCALE_PRESETS:
            scale.update(SCALE_PRESETS[item])
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in SCALE_KEYS:
            raise FlashVLMError(
                f"--scale {item!r}: use a preset ({', '.join(SCALE_PRESETS)}) or KEY=VALUE with KEY in "
                f"{', '.join(SCALE_KEYS)}"
            )
        try:
            number = float(value)
        except ValueError:
            raise FlashVLMError(f"--scale {item!r}: {value!r} is not a number") from None
        if key == "width" and not 0.0 < number <= 1.0:
            raise FlashVLMError(f"--scale width must be in (0, 1]; got {value}")
        if key != "width" and (number < 1 or number != int(number)):
            raise FlashVLMError(f"--scale {key} must be an integer >= 1; got {value}")
        scale[key] = number if key == "width" else int(number)
    return scale


def _shrink_width(sub_config, width: float, hidden_keys: tuple[str, ...], head_keys: tuple[str, ...]) -> None:
    """Scale widths by ``width`` keeping the head size: heads scale, hidden = heads * head size."""
    hidden = getattr(sub_config, hidden_keys[0])
    heads_key = head_keys[0]
    heads = getattr(sub_config, heads_key)
    head_size = getattr(sub_config, "head_dim", None) or hidden // heads
    new_heads = max(1, round(heads * width))
    setattr(sub_config, heads_key, new_heads)
    if len(head_keys) > 1 and getattr(sub_config, head_keys[1], None):
        kv_heads = getattr(sub_config, head_keys[1])
        group = max(1, heads // kv_heads)
        setattr(sub_config, head_keys[1], max(1, new_heads // group))
        if new_heads % getattr(sub_config, head_keys[1]):
            setattr(sub_config, head_keys[1], new_heads)
    for key in hidden_keys:
        if key == hidden_keys[0]:
            setattr(sub_config, key, new_heads * head_size)
        elif getattr(sub_config, key, None):
            setattr(sub_config, key, max(8, round(getattr(sub_config, key) * width / 8) * 8))
    if getattr(sub_config, "head_dim", None):
        sub_config.head_dim = head_size


def scale_config(config, scale: dict[str, float]):
    """A copy of ``config`` shrunk as ``scale`` says; token counts are unchanged."""
    scaled = copy.deepcopy(config)
    family = family_of(config)
    text, vision = scaled.text_config, scaled.vision_config
    if "lm_layers" in scale:
        text.num_hidden_layers = min(int(scale["lm_layers"]), text.num_hidden_layers)
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[: text.num_hidden_layers]
    if "vision_layers" in scale:
        family.shrink_vision_layers(vision, int(scale["vision_layers"]))
    width = scale.get("width", 1.0)
    if width < 1.0:
        _shrink_width(text, width, ("hidden_size", "intermediate_size"), ("num_attention_heads", "num_key_value_heads"))
        family.shrink_vision_width(vision, width)
        family.link_widths(scaled)
    return scaled


def describe_shape(config, scale: dict[str, float], reference=None) -> str:
    """One line saying which dimensions were scaled from the real config."""
    reference = reference if reference is not None else config
    if not scale:
        return "full size"
    text, vision = config.text_config, config.vision_config
    real_text, real_vision = reference.text_config, reference.vision_config
    family = family_of(config)
    parts = [
        f"LM {text.num_hidden_layers} of {real_text.num_hidden_layers} layers, "
        f"hidden {text.hidden_size} of {real_text.hidden_size}, MLP {text.intermediate_size} of {real_text.intermediate_size}",
        f"vision {family.vision_layer_count(vision)} of {family.vision_layer_count(real_vision)} layers, "
        f"hidden {vision.hidden_size} of {real_vision.hidden_size}",
    ]
    return "SCALED: " + "; ".join(parts)


def build_model(config, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa", seed: int = 0):
    """The model class named by the config, with random weights, in eval mode on ``device``.

    Built directly in ``dtype`` on ``device``: a 13B model never exists in float32.
    """
    import transformers

    model_class = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class._from_config(copy.deepcopy(config), dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def build_meta_model(config):
    """The model on the meta device (no memory): for parameter counts and shape checks."""
    import transformers

    model_class = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        return model_class(copy.deepcopy(config))


def load_model_for_bench(name_or_path: str, scale: dict, device: torch.device, dtype: torch.dtype, attn: str):
    """(model, config it was built from, the real config, "pretrained" or "random").

    A model folder with safetensors weights is loaded with ``from_pretrained`` unless
    ``scale`` shrinks it; everything else gets random weights from the config.
    """
    real_config = load_config(name_or_path)
    folder = Path(name_or_path)
    if folder.is_dir() and any(folder.glob("*.safetensors")) and not scale:
        import transformers

        model_class = getattr(transformers, real_config.architectures[0])
        model = model_class.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
        return model.to(device).eval(), model.config, real_config, "pretrained"
    config = scale_config(real_config, scale)
    return build_model(config, device, dtype, attn), config, real_config, "random"


@dataclass
class SyntheticInputs:
    """Generate/forward arguments with one image (or one video) per row, and what they hold."""

    model_kwargs: dict
    visual_tokens_per_image: int  # N: placeholder tokens of the row's image or video
    text_tokens: int  # non-visual prompt tokens per row (structural tokens such as <img> included)
    num_images: int  # rows, one image or video each
    placeholder_token_id: int  # the id of the N placeholders in input_ids
    layout: str  # the visual input in words, for the report: "one image, 2 x 2 tiles + thumbnail"

    def to(self, device: torch.device | str) -> SyntheticInputs:
        """The same inputs with every tensor on ``device`` (they are drawn on the CPU, so a
        seed gives the same prompt and pixels on every device)."""
        moved = {
            name: value.to(device) if torch.is_tensor(value) else value for name, value in self.model_kwargs.items()
        }
        return dataclasses.replace(self, model_kwargs=moved)


def _text_ids(generator: torch.Generator, count: int, vocab: int, avoid: set[int]) -> torch.Tensor:
    ids = torch.randint(3, min(vocab, 32000), (count,), generator=generator)
    for token in avoid:
        ids[ids == token] = 3
    return ids


def _prompt_rows(
    generator: torch.Generator,
    batch: int,
    text_count: int,
    vocab: int,
    avoid: set[int],
    visual_block: list[int],
    prefix: tuple[int, ...] = (),
) -> torch.Tensor:
    """(B, len(prefix) + text_count + len(visual_block)): the prefix (a BOS), 5 random text
    tokens, the visual block (placeholders and the family's markers), the rest of the text."""
    rows = []
    for _ in range(batch):
        text = _text_ids(generator, text_count, vocab, avoid)
        head = min(5, text.numel())
        rows.append(
            torch.cat([torch.tensor(prefix, dtype=torch.long), text[:head], torch.tensor(visual_block), text[head:]])
        )
    return torch.stack(rows)


@dataclass
class Family:
    """How the benchmark drives one model family (one ``model_type``)."""

    model_type: str
    make_inputs: Callable[..., SyntheticInputs]  # (config, batch, text_tokens, seed) -> inputs
    #: (config, visual tokens per image, pruned, rows projected, batch) -> (vision, projector) FLOPs
    vision_flops: Callable[..., tuple[float, float]]
    vision_layer_count: Callable = field(default=lambda vision: vision.num_hidden_layers)
    shrink_vision_layers: Callable = field(default=None)
    shrink_vision_width: Callable = field(default=None)
    link_widths: Callable = field(default=lambda config: None)
    #: Whether ``bench-selection``'s tower comparison serves it (it drives LLaVA-1.5's CLIP encoding).
    compares_tower: bool = False
    #: (config) -> width of the vision features a method compares (what the projector consumes).
    feature_width: Callable = field(default=lambda config: config.vision_config.hidden_size)


# -- LLaVA-1.5 and LLaVA-NeXT (CLIP tower, MLP projector) ---------------------------------


def _llava_prompt(
    config, batch: int, text_tokens: int, visual_tokens: int, seed: int, placeholder: int | None = None
) -> torch.Tensor:
    """(B, text_tokens + visual_tokens): BOS, 5 text tokens, the image (or video), the rest of the text."""
    placeholder = config.image_token_id if placeholder is None else placeholder
    generator = torch.Generator().manual_seed(seed)
    block = [placeholder] * visual_tokens
    return _prompt_rows(generator, batch, text_tokens - 1, config.text_config.vocab_size, {placeholder}, block, (1,))


def llava_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    side = flops.patch_grid_side(config.vision_config)
    image_tokens = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    input_ids = _llava_prompt(config, batch, text_tokens, image_tokens, seed)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels)
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, f"one {size} px image")


def llava_next_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """A square image at the largest square AnyRes resolution: base view + g x g crops."""
    size = config.vision_config.image_size
    squares = [h for h, w in config.image_grid_pinpoints if h == w]
    resolution = max(squares) if squares else size
    grid = resolution // size
    side = flops.patch_grid_side(config.vision_config)
    image_tokens = side * side + (grid * side) ** 2 + grid * side  # base + crops + one newline per row
    input_ids = _llava_prompt(config, batch, text_tokens, image_tokens, seed)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 1 + grid * grid, 3, size, size, generator=generator)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixels,
        image_sizes=torch.tensor([[resolution, resolution]] * batch),
    )
    layout = f"one {resolution} px image: base view + {grid} x {grid} crops"
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, layout)


def _clip_shrink_layers(vision, layers: int) -> None:
    vision.num_hidden_layers = min(layers, vision.num_hidden_layers)


def _clip_shrink_width(vision, width: float) -> None:
    _shrink_width(vision, width, ("hidden_size", "intermediate_size"), ("num_attention_heads",))


# -- Qwen2.5-VL (windowed ViT with 2x2 merger, M-RoPE LM) ---------------------------------

#: Image side in pixels for Qwen2.5-VL inputs: 672 px -> 48 x 48 patches -> 576 LM tokens.
QWEN_IMAGE_SIDE = 672


def qwen2_5_vl_inputs(
    config, batch: int, text_tokens: int, seed: int = 0, image_side: int = QWEN_IMAGE_SIDE
) -> SyntheticInputs:
    vision = config.vision_config
    patches_side = image_side // vision.patch_size
    merge = vision.spatial_merge_size
    image_tokens = (patches_side // merge) ** 2
    generator = torch.Generator().manual_seed(seed)
    avoid = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
    image = [config.vision_start_token_id] + [config.image_token_id] * image_tokens + [config.vision_end_token_id]
    input_ids = _prompt_rows(generator, batch, text_tokens - 2, config.text_config.vocab_size, avoid, image)
    patch_width = 3 * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(batch * patches_side**2, patch_width, generator=generator)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixels,
        image_grid_thw=torch.tensor([[1, patches_side, patches_side]] * batch),
    )
    layout = f"one {image_side} px image"
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, layout)


def _qwen_shrink_layers(vision, layers: int) -> None:
    vision.depth = min(layers, vision.depth)
    # Keep the last kept block a full-attention one, as every real checkpoint has it.
    full = [index for index in vision.fullatt_block_indexes if index < vision.depth]
    vision.fullatt_block_indexes = sorted(set(full) | {vision.depth - 1})


def _qwen_shrink_width(vision, width: float) -> None:
    _shrink_width(vision, width, ("hidden_size", "intermediate_size"), ("num_heads",))


def _qwen_link_widths(config) -> None:
    config.vision_config.out_hidden_size = config.text_config.hidden_size


# -- Qwen3-VL (full-attention ViT, 2x2 merger, DeepStack, M-RoPE LM) -----------------------------

#: Image side in pixels for Qwen3-VL inputs: 768 px -> 48 x 48 patches of 16 -> 576 LM tokens.
QWEN3_IMAGE_SIDE = 768


def qwen3_vl_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """As Qwen2.5-VL's, at 16-px patches, with the ``mm_token_type_ids`` Qwen3-VL requires."""
    inputs = qwen2_5_vl_inputs(config, batch, text_tokens, seed, image_side=QWEN3_IMAGE_SIDE)
    input_ids = inputs.model_kwargs["input_ids"]
    inputs.model_kwargs["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    return inputs


def _qwen3_shrink_layers(vision, layers: int) -> None:
    # DeepStack taps keep their relative depths in the shortened tower.
    depth = vision.depth
    vision.depth = min(layers, depth)
    taps = sorted({min(vision.depth - 1, index * vision.depth // depth) for index in vision.deepstack_visual_indexes})
    vision.deepstack_visual_indexes = taps


# -- Gemma 3 (SigLIP tower, pooled to 256 tokens, bidirectional image attention) -------------------


def gemma3_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """BOS, 5 text tokens, begin-image, the image's tokens, end-image, the rest of the text."""
    generator = torch.Generator().manual_seed(seed)
    image_tokens = config.mm_tokens_per_image
    avoid = {config.image_token_id, config.boi_token_index, config.eoi_token_index}
    image = [config.boi_token_index] + [config.image_token_id] * image_tokens + [config.eoi_token_index]
    input_ids = _prompt_rows(generator, batch, text_tokens - 3, config.text_config.vocab_size, avoid, image, (2,))
    size = config.vision_config.image_size
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        token_type_ids=(input_ids == config.image_token_id).long(),
        pixel_values=torch.randn(batch, 3, size, size, generator=generator),
    )
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, f"one {size} px image")


# -- InternVL3/3.5, HF-native (InternViT on dynamic tiles, pixel shuffle, MLP projector) ------------

#: Tiles a side of InternVL's synthetic image: a square image of 900 px or so is cut 2 x 2, plus the thumbnail.
INTERNVL_TILE_GRID = 2


def internvl_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """``<img>``, the context tokens of g x g tiles and the thumbnail, ``</img>``, as InternVLProcessor
    writes them. The config does not hold the ids of ``<img>``/``</img>``: they are taken as the two
    ids below the context token, where InternVL3/3.5's tokenizers put them."""
    generator = torch.Generator().manual_seed(seed)
    tiles = INTERNVL_TILE_GRID**2 + 1
    image_tokens = tiles * flops.internvl_tokens_per_tile(config)
    start, end = config.image_token_id - 2, config.image_token_id - 1
    image = [start] + [config.image_token_id] * image_tokens + [end]
    avoid = {start, end, config.image_token_id}
    input_ids = _prompt_rows(generator, batch, text_tokens - 2, config.text_config.vocab_size, avoid, image)
    size = flops.square_size(config.vision_config.image_size)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(batch * tiles, 3, size, size, generator=generator),  # every row's tiles, in order
    )
    layout = f"one image: {INTERNVL_TILE_GRID} x {INTERNVL_TILE_GRID} tiles of {size} px + thumbnail"
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, layout)


# -- Idefics3 / SmolVLM (SigLIP on split sub-images, pixel shuffle, row/column markers) ------------

#: Sub-images a side of the synthetic image: the processors resize an image's longest edge to
#: 4 sub-image sides (1,536 px for SmolVLM2, 1,456 px for Idefics3), so a square image splits 4 x 4.
IDEFICS3_SPLIT = 4


def idefics3_image_block(config, split: int, per_sub_image: int) -> list[int]:
    """One split image as Idefics3Processor / SmolVLMProcessor write it: per sub-image
    ``<fake_token_around_image><row_i_col_j>`` and its tokens, a newline after each row, then a
    newline, ``<fake_token_around_image><global-img>``, the global view's tokens, ``<fake_token_around_image>``.
    The config does not hold the markers' ids: ``<fake_token_around_image>`` is the id below the
    image token (as in SmolVLM2's tokenizer), the others the ids below it."""
    image = [config.image_token_id] * per_sub_image
    fake, global_image, newline = config.image_token_id - 1, config.image_token_id - 2, config.image_token_id - 3
    block = []
    for row in range(split):
        for col in range(split):
            row_col = config.image_token_id - 4 - (row * split + col)
            block += [fake, row_col, *image]
        block.append(newline)
    return block + [newline, fake, global_image, *image, fake]


def idefics3_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """BOS, 5 text tokens, a 4 x 4 split image and its global view, the rest of the text. The
    row/column markers (40 at a 4 x 4 split) come on top of ``text_tokens``: they are text the
    language model prefills, so the inputs' ``text_tokens`` counts them."""
    generator = torch.Generator().manual_seed(seed)
    per_sub_image = flops.idefics3_tokens_per_sub_image(config)
    block = idefics3_image_block(config, IDEFICS3_SPLIT, per_sub_image)
    vocab = config.text_config.vocab_size
    input_ids = _prompt_rows(generator, batch, text_tokens - 1, vocab, set(block), block, (1,))
    sub_images = IDEFICS3_SPLIT**2 + 1
    size = config.vision_config.image_size
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(batch, sub_images, 3, size, size, generator=generator),  # (B, S, 3, H, W)
        pixel_attention_mask=torch.ones(batch, sub_images, size, size, dtype=torch.bool),
    )
    layout = f"one image split {IDEFICS3_SPLIT} x {IDEFICS3_SPLIT} into {size} px sub-images + global view"
    visual = sub_images * per_sub_image
    markers = len(block) - visual
    return SyntheticInputs(kwargs, visual, text_tokens + markers, batch, config.image_token_id, layout)


# -- LLaVA-NeXT-Video (CLIP on every frame, 2 x 2 pooling, MLP projector) --------------------------

#: Frames of the synthetic video (the number the model card's examples sample).
VIDEO_FRAMES = 8


def llava_next_video_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """BOS, 5 text tokens, a video of 8 frames, the rest of the text: the budget counts per frame
    (``video_budget="per_frame"``, the default), so K per frame, 8 K per row."""
    video_tokens = VIDEO_FRAMES * flops.llava_next_video_tokens_per_frame(config)
    input_ids = _llava_prompt(config, batch, text_tokens, video_tokens, seed, placeholder=config.video_token_id)
    size = config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values_videos=torch.randn(batch, VIDEO_FRAMES, 3, size, size, generator=generator),  # (B, F, 3, H, W)
    )
    layout = f"one video of {VIDEO_FRAMES} frames of {size} px, budget per frame"
    return SyntheticInputs(kwargs, video_tokens, text_tokens, batch, config.video_token_id, layout)


def _idefics3_family(model_type: str) -> Family:
    return Family(
        model_type,
        idefics3_inputs,
        flops.idefics3_vision_flops,
        shrink_vision_layers=_clip_shrink_layers,
        shrink_vision_width=_clip_shrink_width,
        feature_width=flops.idefics3_feature_width,
    )


FAMILIES: dict[str, Family] = {
    "llava": Family(
        "llava",
        llava_inputs,
        flops.llava_vision_flops,
        shrink_vision_layers=_clip_shrink_layers,
        shrink_vision_width=_clip_shrink_width,
        compares_tower=True,
    ),
    "llava_next": Family(
        "llava_next",
        llava_next_inputs,
        flops.llava_next_vision_flops,
        shrink_vision_layers=_clip_shrink_layers,
        shrink_vision_width=_clip_shrink_width,
    ),
    "qwen2_5_vl": Family(
        "qwen2_5_vl",
        qwen2_5_vl_inputs,
        flops.qwen_vision_flops,
        vision_layer_count=lambda vision: vision.depth,
        shrink_vision_layers=_qwen_shrink_layers,
        shrink_vision_width=_qwen_shrink_width,
        link_widths=_qwen_link_widths,
    ),
    "qwen3_vl": Family(
        "qwen3_vl",
        qwen3_vl_inputs,
        flops.qwen3_vision_flops,
        vision_layer_count=lambda vision: vision.depth,
        shrink_vision_layers=_qwen3_shrink_layers,
        shrink_vision_width=_qwen_shrink_width,
        link_widths=_qwen_link_widths,
    ),
    "gemma3": Family(
        "gemma3",
        gemma3_inputs,
        flops.gemma3_vision_flops,
        shrink_vision_layers=_clip_shrink_layers,
        shrink_vision_width=_clip_shrink_width,
    ),
    "internvl": Family(
        "internvl",
        internvl_inputs,
        flops.internvl_vision_flops,
        shrink_vision_layers=_clip_shrink_layers,
        shrink_vision_width=_clip_shrink_width,
        feature_width=flops.internvl_feature_width,
    ),
    "idefics3": _idefics3_family("idefics3"),
    "smolvlm": _idefics3_family("smolvlm"),
    "llava_next_video": Family(
        "llava_next_video",
        llava_next_video_inputs,
        flops.llava_next_video_vision_flops,
        shrink_vision_layers=_clip_shrink_layers,
        shrink_vision_width=_clip_shrink_width,
    ),
}


def family_of(config) -> Family:
    """The benchmark's record for the family of ``config`` (by its ``model_type``)."""
    if config.model_type not in FAMILIES:
        raise FlashVLMError(f"model_type {config.model_type!r}: the benchmark knows {', '.join(sorted(FAMILIES))}")
    return FAMILIES[config.model_type]


def prefill_flops(
    config, text_tokens: int, visual_tokens: int, kept_tokens: int, batch: int, projected_tokens: int | None = None
) -> flops.PrefillFlops:
    """FLOPs of a prefill with ``kept_tokens`` of each image's ``visual_tokens`` in the LM.

    ``kept_tokens == visual_tokens`` is the unpruned model. ``projected_tokens`` is how
    many rows go through the projector (all N for methods that score projected tokens,
    K otherwise; default K). The vision side is the family's (``Family.vision_flops``).
    Sliding-window layers (Gemma 3) are counted as full causal attention, which they are
    for prompts within the window.
    """
    pruned = kept_tokens < visual_tokens
    projected = kept_tokens if projected_tokens is None else projected_tokens
    language_model = flops.decoder_prefill_flops(config.text_config, text_tokens + kept_tokens, batch)
    vision, projector = family_of(config).vision_flops(config, visual_tokens, pruned, projected, batch)
    return flops.PrefillFlops(vision, projector, language_model)


def synthetic_inputs(config, batch: int, text_tokens: int, seed: int = 0) -> SyntheticInputs:
    """Prompt of ``text_tokens`` text tokens around one image per row, with random pixels."""
    return family_of(config).make_inputs(config, batch, text_tokens, seed)
