"""The multimodal-processor side: K placeholders per image, the prompt's text and the request's
own settings per image.

vLLM fixes each image's placeholder count when it processes the prompt, before the
encoder runs, so a budget is a fixed K per image here; the method decides after the
encoder *which* K rows fill the K slots. The prompt's token ids are visible to the
processor's ``apply`` only, so they travel on to the encoder as a per-image field, and so
do a request's own settings (``mm_processor_kwargs={"flashvlm": {...}}``), which set its K.

The cache-key rule: the text and the request's settings go in as processor keyword
arguments, and vLLM hashes every processor keyword argument into each item's multimodal hash
(even when the user gives the image a UUID). That hash keys the processor cache, the encoder
cache and the prefix cache's visual blocks, so one image asked two questions, or at two
budgets, gets two selections, while the same image with the same prompt and settings is
still served from the caches. A method that does not read the text, run with the engine's
settings, leaves the key as stock vLLM has it.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property

import torch

from .pruned_model import SETTINGS_FIELD, TEXT_IDS_FIELD, pack_prompt_text, pack_settings
from .settings import (
    CONFIG_KEY,
    SERVED_REQUIREMENTS,
    PruningSettings,
    request_settings,
    settings_from_json,
    settings_of,
)

#: Processor keyword arguments that are the plug-in's: vLLM's HF processor never sees them.
PLUGIN_KWARGS = (CONFIG_KEY, TEXT_IDS_FIELD)


class PrunedInfoMixin:
    """For a family's ``ProcessingInfo``: the engine's settings, read once from the model's
    config, and the settings of each processor call."""

    #: What the family's model class hands a method (a family without a CLS token has less).
    flashvlm_served: frozenset[str] = SERVED_REQUIREMENTS

    @cached_property
    def flashvlm(self) -> PruningSettings | None:
        return settings_of(self.ctx.model_config.hf_config, self.flashvlm_served)

    def flashvlm_request(self, value: object) -> str | None:
        """A request's ``mm_processor_kwargs["flashvlm"]`` over the engine's settings, checked:
        their JSON, or None when they come to the engine's (see ``settings.request_settings``)."""
        engine_value = getattr(self.ctx.model_config.hf_config, CONFIG_KEY, None)
        return request_settings(engine_value, value, self.flashvlm_served)

    def flashvlm_settings(self, processor_kwargs) -> PruningSettings | None:
        """The settings of one processor call: its request's (the JSON ``apply`` put under
        ``CONFIG_KEY``), else the engine's (None: stock vLLM)."""
        text = processor_kwargs.get(CONFIG_KEY)
        return self.flashvlm if text is None else settings_from_json(text, self.flashvlm_served)


class PrunedProcessorMixin:
    """For a family's multimodal processor: each image's placeholders, and the prompt's text
    and the request's own settings as per-image fields.

    A family sets :meth:`flashvlm_placeholder_ids`, the token ids that are not text (the
    visual placeholders and the markers around them that the HF adapter also leaves out).
    """

    def flashvlm_placeholder_ids(self) -> frozenset[int]:
        raise NotImplementedError

    def flashvlm_num_placeholders(self, settings: PruningSettings, num_placeholders: int, mm_items, item_idx) -> int:
        """Placeholders image ``item_idx`` keeps of the ``num_placeholders`` stock vLLM gives it
        (one per visual token here; LLaVA-NeXT adds its rows' newlines)."""
        return settings.num_kept(num_placeholders)

    def apply(self, inputs, timing_ctx):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        if CONFIG_KEY in kwargs:
            request = self.info.flashvlm_request(kwargs.pop(CONFIG_KEY))
            if request is not None:
                kwargs[CONFIG_KEY] = request
        settings = self.info.flashvlm_settings(kwargs)
        if settings is not None and "text" in settings.selector.requires:
            kwargs[TEXT_IDS_FIELD] = pack_prompt_text(inputs.prompt, self.flashvlm_placeholder_ids())
        return super().apply(replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        # Here rather than in _call_hf_processor: Qwen3-VL's processor calls the HF processor itself.
        hf_kwargs = dict(hf_kwargs)
        text_ids = hf_kwargs.pop(TEXT_IDS_FIELD, None)
        request = hf_kwargs.pop(CONFIG_KEY, None)
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        needed = text_ids is not None or request is not None
        num_images = self.flashvlm_num_images(processed) if needed else 0
        if num_images:  # (a prompt with videos only, or with every image cached, has none to guide)
            # Every image of a prompt has the same text and settings: one row each, (I, ...).
            if text_ids is not None:
                processed[TEXT_IDS_FIELD] = torch.tensor(text_ids, dtype=torch.long).repeat(num_images, 1)
            if request is not None:
                processed[SETTINGS_FIELD] = pack_settings(request).repeat(num_images, 1)
        return processed

    def flashvlm_num_images(self, processed) -> int:
        """Images in the HF processor's output (one row of ``pixel_values`` each by default)."""
        return len(processed.get("pixel_values", ()))

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for field in (TEXT_IDS_FIELD, SETTINGS_FIELD):
            if field in hf_inputs:
                from vllm.multimodal.inputs import MultiModalFieldConfig

                fields[field] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        settings = self.info.flashvlm_settings(hf_processor_mm_kwargs)
        # vLLM keys its cached HF processors by these kwargs: the plug-in's would build one per prompt.
        stock_kwargs = {key: value for key, value in hf_processor_mm_kwargs.items() if key not in PLUGIN_KWARGS}
        updates = super()._get_prompt_updates(mm_items, stock_kwargs, out_mm_kwargs)
        if settings is None:
            return updates

        def with_kept_placeholders(update):
            def replacement(item_idx: int):
                placeholders = update.replacement(item_idx)  # stock vLLM's, one per visual token
                return placeholders[: self.flashvlm_num_placeholders(settings, len(placeholders), mm_items, item_idx)]

            return replace(update, replacement=replacement)

        return [with_kept_placeholders(update) if update.modality == "image" else update for update in updates]
