"""The multimodal-processor side: K placeholders per image (and per video frame, or per
video, where the family prunes videos), the prompt's text and the request's own settings
per item.

vLLM fixes each item's placeholder count when it processes the prompt, before the
encoder runs, so a budget is a fixed K per image here; the method decides after the
encoder *which* K rows fill the K slots. The prompt's token ids are visible to the
processor's ``apply`` only, so they travel on to the encoder as a per-item field, and so
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

from ...errors import FlashVLMError
from ...pipeline import VIDEO_BUDGETS
from .pruned_model import SETTINGS_FIELD, TEXT_IDS_FIELD, item_field, pack_prompt_text, pack_settings
from .settings import (
    CONFIG_KEY,
    SERVED_REQUIREMENTS,
    VIDEO_BUDGET_KEY,
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
    #: The video budgets the family serves (one placeholder run per frame admits only "per_frame").
    flashvlm_video_budgets: tuple[str, ...] = VIDEO_BUDGETS

    @cached_property
    def flashvlm(self) -> PruningSettings | None:
        settings = settings_of(self.ctx.model_config.hf_config, self.flashvlm_served)
        return self.flashvlm_check(settings, f'hf_overrides["{CONFIG_KEY}"]')

    def flashvlm_request(self, value: object) -> str | None:
        """A request's ``mm_processor_kwargs["flashvlm"]`` over the engine's settings, checked:
        their JSON, or None when they come to the engine's (see ``settings.request_settings``)."""
        engine_value = getattr(self.ctx.model_config.hf_config, CONFIG_KEY, None)
        text = request_settings(engine_value, value, self.flashvlm_served)
        if text is not None:
            self.flashvlm_check(settings_from_json(text, self.flashvlm_served), f'mm_processor_kwargs["{CONFIG_KEY}"]')
        return text

    def flashvlm_check(self, settings: PruningSettings | None, where: str) -> PruningSettings | None:
        """``settings``, or :class:`FlashVLMError` in one line where the family cannot serve them."""
        if settings is not None and settings.video_budget not in self.flashvlm_video_budgets:
            raise FlashVLMError(
                f"{where}: {VIDEO_BUDGET_KEY}={settings.video_budget!r} is not served for this model: it lays out "
                f"a video as one placeholder run per frame, whose length vLLM fixes before the selection; "
                f"use {' or '.join(repr(budget) for budget in self.flashvlm_video_budgets)}"
            )
        return settings

    def flashvlm_settings(self, processor_kwargs) -> PruningSettings | None:
        """The settings of one processor call: its request's (the JSON ``apply`` put under
        ``CONFIG_KEY``), else the engine's (None: stock vLLM)."""
        text = processor_kwargs.get(CONFIG_KEY)
        return self.flashvlm if text is None else settings_from_json(text, self.flashvlm_served)


class PrunedProcessorMixin:
    """For a family's multimodal processor: each image's (and video's) placeholders, and the
    prompt's text and the request's own settings as per-item fields.

    A family sets :meth:`flashvlm_placeholder_ids`, the token ids that are not text (the
    visual placeholders and the markers around them that the HF adapter also leaves out);
    one that prunes videos lists "video" in :attr:`flashvlm_modalities` and sets
    :meth:`flashvlm_video_placeholders`.
    """

    #: The modalities whose items the family selects from (other items are served unpruned).
    flashvlm_modalities: tuple[str, ...] = ("image",)

    def flashvlm_placeholder_ids(self) -> frozenset[int]:
        raise NotImplementedError

    def flashvlm_video_placeholders(self, settings: PruningSettings, stock, out_mm_kwargs, item_idx: int):
        """Video ``item_idx``'s replacement with the kept placeholders (``stock``: vLLM's)."""
        raise NotImplementedError

    def flashvlm_guiding_prompt(self, prompt: list[int], processed, mm_items) -> list[int]:
        """The prompt as the HF processor expands it, up to repeated placeholders, so that its
        text is what guides the selection in transformers (Qwen3-VL adds each frame's
        timestamp; InternVL and Idefics3 the markers around each image): ``processed`` is the
        HF processor's output and ``mm_items`` the items it processed. Most processors only
        repeat placeholders: the prompt itself."""
        return prompt

    def flashvlm_image_placeholders(self, settings: PruningSettings, stock, mm_items, item_idx: int):
        """Image ``item_idx``'s replacement with the kept placeholders (``stock``: vLLM's, one
        placeholder per visual token)."""
        return stock[: self.flashvlm_num_placeholders(settings, len(stock), mm_items, item_idx)]

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
            # The prompt as it came (it enters the items' hash); packed once the HF processor ran.
            kwargs[TEXT_IDS_FIELD] = tuple(inputs.prompt)
        return super().apply(replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        # Here rather than in _call_hf_processor: Qwen3-VL's processor calls the HF processor itself.
        hf_kwargs = dict(hf_kwargs)
        prompt = hf_kwargs.pop(TEXT_IDS_FIELD, None)
        request = hf_kwargs.pop(CONFIG_KEY, None)
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if prompt is None and request is None:
            return processed
        text_ids = None
        for modality in self.flashvlm_modalities:
            count = self.flashvlm_num_items(processed, modality)
            if not count:  # (a prompt without this modality, or with every such item cached)
                continue
            # Every item of a prompt has the same text and settings: one row each, (I, ...).
            if prompt is not None:
                if text_ids is None:
                    expanded = self.flashvlm_guiding_prompt(list(prompt), processed, mm_items)
                    text_ids = pack_prompt_text(expanded, self.flashvlm_placeholder_ids())
                processed[item_field(TEXT_IDS_FIELD, modality)] = torch.tensor(text_ids, dtype=torch.long).repeat(
                    count, 1
                )
            if request is not None:
                processed[item_field(SETTINGS_FIELD, modality)] = pack_settings(request).repeat(count, 1)
        return processed

    def flashvlm_num_items(self, processed, modality: str) -> int:
        """Items of ``modality`` in the HF processor's output (images: :meth:`flashvlm_num_images`;
        videos: one row of ``pixel_values_videos`` each by default)."""
        if modality == "image":
            return self.flashvlm_num_images(processed)
        return len(processed.get("pixel_values_videos", ()))

    def flashvlm_num_images(self, processed) -> int:
        """Images in the HF processor's output (one row of ``pixel_values`` each by default)."""
        return len(processed.get("pixel_values", ()))

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for modality in self.flashvlm_modalities:
            for field in (item_field(TEXT_IDS_FIELD, modality), item_field(SETTINGS_FIELD, modality)):
                if field in hf_inputs:
                    from vllm.multimodal.inputs import MultiModalFieldConfig

                    fields[field] = MultiModalFieldConfig.batched(modality)
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
                return self.flashvlm_image_placeholders(settings, update.replacement(item_idx), mm_items, item_idx)

            return replace(update, replacement=replacement)

        def with_kept_video_placeholders(update):
            def replacement(item_idx: int):
                return self.flashvlm_video_placeholders(settings, update.replacement(item_idx), out_mm_kwargs, item_idx)

            return replace(update, replacement=replacement)

        kept = {"image": with_kept_placeholders, "video": with_kept_video_placeholders}
        return [
            kept[update.modality](update) if update.modality in self.flashvlm_modalities else update
            for update in updates
        ]


def cut_embedding_runs(details, kept_per_run: list[int]):
    """vLLM's ``PromptUpdateDetails`` (text tokens and runs of embedding placeholders, as
    InternVL's ``<img>``, placeholders, ``</img>``) with run ``i`` cut to its first
    ``kept_per_run[i]`` placeholders; the text stays as it is."""
    from vllm.multimodal.processing import PromptUpdateDetails

    is_embed = [True] * len(details.full) if details.is_embed is None else details.is_embed(details.full).tolist()
    kept, run, place_in_run = [], -1, 0
    for place, (token, embedded) in enumerate(zip(details.full, is_embed)):
        if embedded:
            if place == 0 or not is_embed[place - 1]:
                run, place_in_run = run + 1, 0
            place_in_run += 1
            if place_in_run > kept_per_run[run]:
                continue
        kept.append(token)
    if run + 1 != len(kept_per_run):
        raise RuntimeError(f"the replacement has {run + 1} placeholder runs, not {len(kept_per_run)}")
    return PromptUpdateDetails(full=kept, is_embed=details.is_embed)
