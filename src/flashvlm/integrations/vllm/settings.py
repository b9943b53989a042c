"""The user's switch: ``hf_overrides={"flashvlm": {"method": ..., "budget": ..., **params}}``.

vLLM copies ``hf_overrides`` onto the model's Hugging Face config, so the settings travel
to every process (front end, engine core, workers) with the config itself. Nothing here
imports vLLM.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from ...errors import FlashVLMError, MethodUnavailableError
from ...selection import Budget, TokenSelector, get_method, resolve_budget, validate_budget
from ...selection.base import _REQUIREMENT_WORDS

#: The key of ``hf_overrides`` (and so the attribute of the Hugging Face config) holding the settings.
CONFIG_KEY = "flashvlm"

#: What the vLLM path hands a method. ``lm_attention`` is missing: it needs a partial
#: language-model pass over the unpruned sequence, which vLLM's fixed placeholder
#: count (decided before the encoder runs) leaves no room for.
SERVED_REQUIREMENTS = frozenset({"saliency", "cls_attention", "text", "projected", "keys", "grid", "release_saliency"})

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

    def num_kept(self, num_tokens: int) -> int:
        """Placeholders an image of ``num_tokens`` visual tokens gets in the prompt."""
        if self.selector.keeps_all:
            return num_tokens
        return resolve_budget(self.budget, num_tokens)


def parse_settings(value: object, served: frozenset[str] = SERVED_REQUIREMENTS) -> PruningSettings:
    """Settings from the ``flashvlm`` entry of ``hf_overrides``; :class:`FlashVLMError` on bad input.

    ``value`` is ``{"budget": 64}`` plus optionally ``"method"`` (a registered name, with a
    preset as ``"flashvlm:release"``; default ``"flashvlm"``) and that method's parameters.
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
    method = params.pop("method", "flashvlm")
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
    return PruningSettings(selector, budget, vision_cache_mb)


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
    try:
        return parse_settings(value, served)
    except FlashVLMError as error:
        raise type(error)(f'hf_overrides["{CONFIG_KEY}"]: {error}') from None
