"""flashvlm inside vLLM: an out-of-tree plug-in that serves pruned vision-language models.

``pip install flashvlm`` next to vLLM declares :func:`register` in vLLM's
``vllm.general_plugins`` entry-point group; vLLM calls it in every process it starts. It
registers flashvlm's model classes under vLLM's own architecture names, and they are inert
unless asked::

    LLM(model=PATH, hf_overrides={"flashvlm": {"method": "flashvlm", "budget": 64}})
    vllm serve PATH --hf-overrides '{"flashvlm": {"method": "flashvlm", "budget": 64}}'

Without that key a model is stock vLLM. See docs/vllm.md for what runs where.

This module imports nothing from vLLM at import time; the model modules are imported by
vLLM's registry only when it builds one of those architectures.
"""

from __future__ import annotations

from .settings import CONFIG_KEY, SERVED_REQUIREMENTS, PruningSettings, parse_settings

#: vLLM architecture name -> "module:class" of the flashvlm model that replaces it.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "flashvlm.integrations.vllm.llava:PrunedLlava",
    "Qwen2_5_VLForConditionalGeneration": "flashvlm.integrations.vllm.qwen2_5_vl:PrunedQwen2_5_VL",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register flashvlm's model classes (idempotent)."""
    from vllm import ModelRegistry

    for architecture, model_class in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, model_class)


__all__ = ["ARCHITECTURES", "CONFIG_KEY", "SERVED_REQUIREMENTS", "PruningSettings", "parse_settings", "register"]
