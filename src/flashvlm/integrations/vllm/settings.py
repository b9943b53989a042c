"""The user's switch: ``hf_overrides={"flashvlm": {"method": ..., "budget": ..., **params}}``.

vLLM copies ``hf_overrides`` onto the model's Hugging Face config, so the settings travel
to every process (front end, engine core, workers) with the config itself. A request may
override them for itself with ``mm_processor_kwargs={"flashvlm": {...}}``
(:func:`request_settings`). Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from ...errors import FlashVLMError, MethodUnavailableError
from ...pipeline import VIDEO_BUDGETS
from ...selection import Budget, TokenSelector, get_method, resolve_budget, validate_budget
from ...selection.base import _REQUIREMENT_WORDS, check_choice

#: The key of ``hf_overrides`` (and so the attribute of the Hugging Face config) holding the
#: settings, and of a request's ``mm_processor_kwargs`` holding its own.
CONFIG_KEY = "flashvlm"
#: How error messages name a request's settings.
REQUEST_SETTINGS = f'mm_processor_kwargs["{CONFIG_KEY}"]'
#: The method when the settings name none.
DEFAULT_METHOD = "flashvlm"

#: What the vLLM path hands a method. ``lm_attention`` is missing: it needs a partial
#: language-model pass over the unpruned sequence, which vLLM's fixed placeholder
#: count (decided before the encoder runs) leaves no room for.
SERVED_REQUIREMENTS = frozenset({"saliency", "cls_attention", "text", "projected", "keys", "grid", "release_saliency"})

#: The settings key saying how a video's budget counts (``flashvlm.prune``'s ``video_budget``):
#: per frame (the default) or for the whole video, its frames selected jointly.
VIDEO_BUDGET_KEY = "video_budget"

#: The settings key of the worker's vision cache (``vision_cache.py``): MiB of images' unpruned
#: tower outputs kept for their next question; 0 turns the cache off.
VISION_CACHE_KEY = "vision_cache_mb"
#: Its default: a few dozen LLaVA-1.5-7B images or about eight LLaVA-NeXT-7B ones in bfloat16.
DEFAULT_VISION_CACHE_MB = 256


@dataclass(frozen=True)
class PruningSettings:
    """One model's pruning: a method instance and the per-image budget."""

    selector: TokenSelector
    budget: Budget
    #: MiB of tower outputs the worker keeps per model (:data:`VISION_CACHE_KEY`); 0: off.
    vision_cache_mb: float = DEFAULT_VISION_CACHE_MB
    #: How a video's budget counts (:data:`VIDEO_BUDGET_KEY`): "per_frame" or "per_video".
    video_budget: str = "per_frame"

    def num_kept(self, num_tokens: int) -> int:
        """Placeholders an image of ``num_tokens`` visual tokens gets in the prompt."""
        if self.selector.keeps_all:
            return num_tokens
        return resolve_budget(self.budget, num_tokens)

    def num_kept_per_frame(self, num_frames: int, per_frame: int) -> list[int]:
        """Placeholders each frame of a video of ``num_frames`` frames of ``per_frame`` tokens
        keeps, when the placeholders are laid out frame by frame ("per_frame" only: per video,
        a frame's count depends on the selection)."""
        if self.video_budget != "per_frame":
            raise FlashVLMError(f"{VIDEO_BUDGET_KEY}={self.video_budget!r} has no fixed count per frame")
        return [self.num_kept(per_frame)] * num_frames

    def num_kept_in_video(self, num_frames: int, per_frame: int) -> int:
        """Placeholders a video of ``num_frames`` frames of ``per_frame`` tokens keeps in all."""
        if self.video_budget == "per_frame":
            return sum(self.num_kept_per_frame(num_frames, per_frame))
        return self.num_kept(num_frames * per_frame)


def parse_settings(value: object, served: frozenset[str] = SERVED_REQUIREMENTS) -> PruningSettings:
    """Settings from the ``flashvlm`` entry of ``hf_overrides``; :class:`FlashVLMError` on bad input.

    ``value`` is ``{"budget": 64}`` plus optionally ``"method"`` (a registered name, with a
    preset as ``"flashvlm:release"``; default ``"flashvlm"``), that method's parameters,
    ``"video_budget"`` and ``"vision_cache_mb"``.
    A method that needs an input this path cannot serve (``served``: what the model
    family's plug-in class provides) is refused here, at start-up.
    """
    if not isinstance(value, Mapping):
        raise FlashVLMError(
            f'the settings must be a mapping like {{"method": "flashvlm", "budget": 64}}; got {value!r}'
        )
    params = dict(value)
    if "budget" not in params:
        raise FlashVLMError(
            'the settings need a "budget": visual tokens per image (an integer >= 1) or a ratio of them in (0, 1]'
        )
    budget = validate_budget(params.pop("budget"))
    vision_cache_mb = validate_vision_cache_mb(params.pop(VISION_CACHE_KEY, DEFAULT_VISION_CACHE_MB))
    video_budget = params.pop(VIDEO_BUDGET_KEY, "per_frame")
    check_choice(VIDEO_BUDGET_KEY, video_budget, VIDEO_BUDGETS)  # as flashvlm.prune checks it
    method = params.pop("method", DEFAULT_METHOD)
    selector = get_method(method, **params)
    unserved = sorted(selector.requires - served)
    if unserved:
        needs = "; ".join(f"{need} ({_REQUIREMENT_WORDS[need]})" for need in unserved)
        raise MethodUnavailableError(
            f"method {method!r} needs {needs}, which the vLLM plug-in does not provide; "
            f"methods it serves need only {', '.join(sorted(served))}"
        )
    if getattr(selector, "text_tokens", "prompt") == "question":
        raise MethodUnavailableError(
            f"method {method!r} reads only the user's question (text_tokens='question'), which vLLM does not "
            "hand the model apart from the prompt; use text_tokens='prompt' (the default) or 'before_image'"
        )
    return PruningSettings(selector, budget, vision_cache_mb, video_budget)


def validate_vision_cache_mb(value: object) -> float:
    """The vision cache's size in MiB (an int or float >= 0), or :class:`FlashVLMError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise FlashVLMError(
            f"{VISION_CACHE_KEY} must be a number of MiB >= 0 (0 turns the vision cache off); got {value!r}"
        )
    return value


def settings_of(hf_config: object, served: frozenset[str] = SERVED_REQUIREMENTS) -> PruningSettings | None:
    """The model's settings, or None when the switch is absent (then the model is stock vLLM).

    Bad settings raise :class:`FlashVLMError` naming the override, so that a server stops at
    start-up (vLLM builds the multimodal processor's dummy inputs before it serves) with the
    reason as its last line.
    """
    value = getattr(hf_config, CONFIG_KEY, None)
    if value is None:
        return None
    return parse_named_settings(value, served, f'hf_overrides["{CONFIG_KEY}"]')


def parse_named_settings(value: object, served: frozenset[str], where: str) -> PruningSettings:
    """:func:`parse_settings`, its error message prefixed by ``where`` the settings came from."""
    try:
        return parse_settings(value, served)
    except FlashVLMError as error:
        raise type(error)(f"{where}: {error}") from None


def request_settings(
    engine_value: object, request_value: object, served: frozenset[str] = SERVED_REQUIREMENTS
) -> str | None:
    """One request's settings (``mm_processor_kwargs={"flashvlm": {...}}``) over the engine's
    (``engine_value``, its ``hf_overrides`` entry), as canonical JSON for :func:`settings_from_json`;
    None when they come to the engine's own. :class:`FlashVLMError` naming the bad value.

    The request's keys override the engine's. A request that names another method than the
    engine's keeps the engine's budget and video budget (unless it gives its own) but none of the engine's
    method parameters, which belong to the engine's method. Only an engine started with the
    switch takes them: without it the model is stock vLLM, and stays so.
    """
    if engine_value is None:
        raise FlashVLMError(
            f'{REQUEST_SETTINGS}: per-request settings need the engine started with hf_overrides={{"{CONFIG_KEY}": '
            '{"budget": ...}}; this one serves stock vLLM'
        )
    if not isinstance(request_value, Mapping):
        raise FlashVLMError(
            f'{REQUEST_SETTINGS}: the settings must be a mapping like {{"budget": 32, "method": "visionzip"}}; '
            f"got {request_value!r}"
        )
    if VISION_CACHE_KEY in request_value:
        raise FlashVLMError(
            f"{REQUEST_SETTINGS}: {VISION_CACHE_KEY} is the engine's (each worker keeps one vision cache); "
            f'set it in hf_overrides["{CONFIG_KEY}"]'
        )
    engine = dict(engine_value)
    engine_method = engine.get("method", DEFAULT_METHOD)
    if request_value.get("method", engine_method) == engine_method:
        base = engine
    else:  # the method's parameters are the engine's method's; the budget and its video rule are not
        base = {key: engine[key] for key in ("budget", VIDEO_BUDGET_KEY) if key in engine}
    merged = {**base, **request_value}
    if merged == engine:
        return None
    try:
        text = json.dumps(merged, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        raise FlashVLMError(
            f"{REQUEST_SETTINGS}: the settings must be JSON values (numbers, strings, booleans, lists); "
            f"got {request_value!r}"
        ) from None
    settings_from_json(text, served)
    return text


@lru_cache(maxsize=256)
def settings_from_json(text: str, served: frozenset[str] = SERVED_REQUIREMENTS) -> PruningSettings:
    """A request's settings from :func:`request_settings`' JSON, parsed once per process: the
    front end validates them with it, and the workers read them back with it."""
    return parse_named_settings(json.loads(text), served, REQUEST_SETTINGS)
