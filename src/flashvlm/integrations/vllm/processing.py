"""The multimodal-processor side: K placeholders per image and the prompt's text per image.

vLLM fixes each image's placeholder count when it processes the prompt, before the
encoder runs, so a budget is a fixed K per image here; the method decides after the
encoder *which* K rows fill the K slots. The prompt's token ids are visible to the
processor's ``apply`` only, so they travel on to the encoder as a per-image field.

The cache-key rule: the text goes in as a processor keyword argument, and vLLM hashes
every processor keyword argument into each item's multimodal hash (even when the user
gives the image a UUID). That hash keys the processor cache, the encoder cache and the
prefix cache's visual blocks, so one image asked two questions gets two selections, while
the same image with the same prompt is still served from the caches. Methods that do not
read the text leave the key as stock vLLM has it.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property

import torch

from .pruned_model import TEXT_IDS_FIELD, pack_prompt_text
from .settings import SERVED_REQUIREMENTS, PruningSettings, settings_of


class PrunedInfoMixin:
    """For a family's ``ProcessingInfo``: the settings, read once from the model's config."""

    #: What the family's model class hands a method (a family without a CLS token has less).
    flashvlm_served: frozenset[str] = SERVED_REQUIREMENTS

    @cached_property
    def flashvlm(self) -> PruningSettings | None:
        return settings_of(self.ctx.model_config.hf_config, self.flashvlm_served)


class TextGuidedProcessorMixin:
    """For a family's multimodal processor: pass the prompt's text ids to each image.

    A family sets :meth:`flashvlm_placeholder_ids`, the token ids that are not text (the
    visual placeholders and the markers around them that the HF adapter also leaves out).
    """

    def flashvlm_placeholder_ids(self) -> frozenset[int]:
        raise NotImplementedError

    def apply(self, inputs, timing_ctx):
        settings = self.info.flashvlm
        if settings is not None and "text" in settings.selector.requires:
            packed = pack_prompt_text(inputs.prompt, self.flashvlm_placeholder_ids())
            processor_kwargs = {**inputs.hf_processor_mm_kwargs, TEXT_IDS_FIELD: packed}
            inputs = replace(inputs, hf_processor_mm_kwargs=processor_kwargs)
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data, hf_kwargs, *args, **kwargs):
        hf_kwargs = dict(hf_kwargs)
        text_ids = hf_kwargs.pop(TEXT_IDS_FIELD, None)
        processed = super()._call_hf_processor(hf_data, hf_kwargs, *args, **kwargs)
        num_images = 0 if text_ids is None else self.flashvlm_num_images(processed)
        if num_images:  # (a prompt with videos only has no image to guide)
            # Every image of a prompt is guided by the same text: (I, 1 + L), TEXT_IDS_FIELD's layout.
            processed[TEXT_IDS_FIELD] = torch.tensor(text_ids, dtype=torch.long).repeat(num_images, 1)
        return processed

    def flashvlm_num_images(self, processed) -> int:
        """Images in the HF processor's output (one row of ``pixel_values`` each by default)."""
        return len(processed["pixel_values"])

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if TEXT_IDS_FIELD in hf_inputs:
            from vllm.multimodal.inputs import MultiModalFieldConfig

            fields[TEXT_IDS_FIELD] = MultiModalFieldConfig.batched("image")
        return fields
