"""What the families' benchmark records share: the record itself, synthetic inputs, prompt
rows, and how a CLIP- or SigLIP-like tower shrinks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import flops


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


def shrink_width(sub_config, width: float, hidden_keys: tuple[str, ...], head_keys: tuple[str, ...]) -> None:
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


def clip_shrink_layers(vision, layers: int) -> None:
    vision.num_hidden_layers = min(layers, vision.num_hidden_layers)


def clip_shrink_width(vision, width: float) -> None:
    shrink_width(vision, width, ("hidden_size", "intermediate_size"), ("num_attention_heads",))


@dataclass
class Family:
    """How the benchmark drives one model family (the configs of ``model_types``)."""

    model_types: tuple[str, ...]
    make_inputs: Callable[..., SyntheticInputs]  # (config, batch, text_tokens, seed) -> inputs
    #: (config, visual tokens per image, pruned, rows projected, batch) -> (vision, projector) FLOPs
    vision_flops: Callable[..., tuple[float, float]]
    vision_layer_count: Callable = field(default=lambda vision: vision.num_hidden_layers)
    #: How ``--scale`` shrinks the tower (a CLIP/SigLIP-like config by default).
    shrink_vision_layers: Callable = field(default=clip_shrink_layers)
    shrink_vision_width: Callable = field(default=clip_shrink_width)
    link_widths: Callable = field(default=lambda config: None)
    #: Whether ``bench-selection``'s tower comparison serves it (it drives LLaVA-1.5's CLIP encoding).
    compares_tower: bool = False
    #: (config) -> width of the vision features a method compares (what the projector consumes).
    feature_width: Callable = field(default=lambda config: config.vision_config.hidden_size)


def _text_ids(generator: torch.Generator, count: int, vocab: int, avoid: set[int]) -> torch.Tensor:
    ids = torch.randint(3, min(vocab, 32000), (count,), generator=generator)
    for token in avoid:
        ids[ids == token] = 3
    return ids


def prompt_rows(
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


def llava_prompt(
    config, batch: int, text_tokens: int, visual_tokens: int, seed: int, placeholder: int | None = None
) -> torch.Tensor:
    """(B, text_tokens + visual_tokens): BOS, 5 text tokens, the image (or video), the rest of the text."""
    placeholder = config.image_token_id if placeholder is None else placeholder
    generator = torch.Generator().manual_seed(seed)
    block = [placeholder] * visual_tokens
    return prompt_rows(generator, batch, text_tokens - 1, config.text_config.vocab_size, {placeholder}, block, (1,))


def vision_layers_run(config, pruned: bool) -> int:
    """LLaVA runs the whole tower unpruned (hidden_states[-2] of a full forward); flashvlm stops at the feature layer."""
    layers = config.vision_config.num_hidden_layers
    if not pruned:
        return layers
    feature = config.vision_feature_layer
    return feature if feature >= 0 else layers + 1 + feature


def llava_projector_flops(config, num_tokens: int) -> float:
    """LLaVA's two-layer MLP projector (vision hidden -> LM hidden -> LM hidden) on ``num_tokens`` rows."""
    vision, hidden = config.vision_config.hidden_size, config.text_config.hidden_size
    return float(2 * num_tokens * (vision * hidden + hidden * hidden))


def anyres_square_inputs(config, batch: int, text_tokens: int, seed: int, grid: int) -> SyntheticInputs:
    """One square AnyRes image of g x g tiles (LLaVA-NeXT, OneVision): the base view, then
    the crops' raster with a newline per row."""
    size = config.vision_config.image_size
    resolution = grid * size
    side = flops.patch_grid_side(config.vision_config)
    image_tokens = side * side + (grid * side) ** 2 + grid * side  # base + crops + one newline per row
    input_ids = llava_prompt(config, batch, text_tokens, image_tokens, seed)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 1 + grid * grid, 3, size, size, generator=generator)  # (B, views, 3, H, W)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=pixels,
        image_sizes=torch.tensor([[resolution, resolution]] * batch),
    )
    layout = f"one {resolution} px image: base view + {grid} x {grid} crops"
    return SyntheticInputs(kwargs, image_tokens, text_tokens, batch, config.image_token_id, layout)


def anyres_views(config, visual_tokens: int) -> int:
    """Tower inputs of an :func:`anyres_square_inputs` image of ``visual_tokens`` tokens: 1 + g x g."""
    side = flops.patch_grid_side(config.vision_config)
    grid = round(((visual_tokens - side * side) / side**2) ** 0.5)
    return 1 + grid * grid
