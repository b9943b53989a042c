"""Models to benchmark: the shipped configs of real VLMs, built with random weights.

Random weights time the same as trained ones, so a benchmark needs only the config.
``--scale`` shrinks a config for a CPU (fewer layers, narrower layers); every scaled
dimension is reported next to the real one, so a scaled run is never mistaken for
the real shape. Token counts (image size, patch size) are never scaled.

Each model family has its record in :mod:`flashvlm.bench.families`: how to build
synthetic inputs with the right number of image placeholders, how its tower shrinks,
and the analytic FLOPs of its vision side.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import torch

from ..errors import FlashVLMError
from . import flops
from .families import BY_MODEL_TYPE, SyntheticInputs, family_of
from .families.shared import shrink_width

#: Short names of the configs shipped in ``flashvlm/bench/configs``.
SHIPPED_CONFIGS = (
    "llava-1.5-7b",
    "llava-1.5-13b",
    "llava-next-7b",
    "llava-onevision-7b",
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
    if model_type not in BY_MODEL_TYPE:
        raise FlashVLMError(
            f"{source} has model_type {model_type!r}; the benchmark knows {', '.join(sorted(BY_MODEL_TYPE))}"
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
        shrink_width(text, width, ("hidden_size", "intermediate_size"), ("num_attention_heads", "num_key_value_heads"))
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
