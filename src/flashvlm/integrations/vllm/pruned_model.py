"""What every family's vLLM model shares: saliency from one vision layer's q/k, the prompt's
text and the request's settings per image, each image's tower output kept for its next
question (``vision_cache.py``), the selection (the shared pipeline, :mod:`flashvlm.pipeline`),
and the record of what was kept.

The vision towers keep vLLM's attention kernels: a forward hook on the feature layer's
fused ``qkv_proj`` captures its queries and keys, from which :mod:`flashvlm.saliency`
computes the one row (CLS attention) or column sum (attention received) the methods need.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import FlashVLMError
from ...pipeline import GuidingText, VisualItem, keep_tokens, select_regions, square_grid, video_units
from .settings import SERVED_REQUIREMENTS, PruningSettings, settings_from_json
from .vision_cache import MIB, EncodedImage, VisionCache, clear_vision_cache

#: Name of the per-image field that carries the prompt's text from the multimodal processor
#: to the encoder step (it is also a processor keyword argument, so it enters the
#: multimodal cache key): per image a (1 + L,) long tensor, the number of text tokens that
#: come before the prompt's first visual placeholder, then the L text token ids in order.
TEXT_IDS_FIELD = "flashvlm_text_ids"

#: Name of the per-image field that carries a request's own settings (``mm_processor_kwargs=
#: {"flashvlm": {...}}``) to the encoder step: per image a (B,) uint8 tensor, the UTF-8 bytes
#: of the settings' canonical JSON (:func:`.settings.request_settings`). Images without it
#: run with the engine's settings.
SETTINGS_FIELD = "flashvlm_settings"


def item_field(field: str, modality: str) -> str:
    """The name a per-item field has for ``modality``'s items: vLLM batches each field over
    one modality, so a video's text and settings travel under names of their own."""
    return field if modality == "image" else f"{field}_{modality}"


#: How many images' selections a model remembers (see :attr:`PrunedModelMixin.flashvlm_history`).
HISTORY_LENGTH = 4096


@dataclass
class QKTap:
    """Queries and keys of one attention layer, as its fused projection produced them."""

    queries: torch.Tensor | None = None  # (..., S, H_local * d)
    keys: torch.Tensor | None = None  # (..., S, H_local * d)


@contextmanager
def tap_qkv_projection(qkv_proj: nn.Module):
    """Capture q and k from a vLLM ``QKVParallelLinear`` during a forward.

    The projection returns ``(output, bias)``; its output holds this rank's heads of q, k and
    v side by side (the vision towers split it with ``chunk(3, dim=-1)``).
    """
    tap = QKTap()

    def keep_queries_and_keys(_module, _args, output):
        projected = output[0] if isinstance(output, tuple) else output
        tap.queries, tap.keys, _ = projected.chunk(3, dim=-1)

    handle = qkv_proj.register_forward_hook(keep_queries_and_keys)
    try:
        yield tap
    finally:
        handle.remove()


@contextmanager
def tap_query_key(query: nn.Module, key: nn.Module):
    """Capture q and k from two modules that produce them apart (a tower's ``q_proj`` and
    ``k_proj``, or the q/k norms after them) during a forward: (..., S, H * d) each."""
    tap = QKTap()

    def keep(name: str):
        def hook(_module, _args, output):
            setattr(tap, name, output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [query.register_forward_hook(keep("queries")), key.register_forward_hook(keep("keys"))]
    try:
        yield tap
    finally:
        for handle in handles:
            handle.remove()


def tensor_parallel_size(attention: nn.Module) -> int:
    """Ranks an attention layer's heads are split over: its ``tp_size``, or where it keeps none
    (Idefics2's SigLIP), its heads over this rank's."""
    tp_size = getattr(attention, "tp_size", None)
    if tp_size is None:
        tp_size = attention.num_heads // getattr(attention, "num_heads_per_partition", attention.num_heads)
    return max(1, tp_size)


def mean_over_tensor_parallel_heads(per_rank_mean: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """A head mean over this rank's heads turned into the mean over all heads.

    Under tensor parallelism each rank's projection holds ``num_heads / tp`` heads; every
    rank must select the same tokens, so the per-rank means are averaged across ranks.
    """
    tp_size = tensor_parallel_size(attention)
    if tp_size == 1:
        return per_rank_mean
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(per_rank_mean.contiguous()) / tp_size


def gather_tensor_parallel_channels(local: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """This rank's head channels (..., H_local * d) gathered into all heads' (..., H * d)."""
    if tensor_parallel_size(attention) == 1:
        return local
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(local.contiguous(), dim=-1)


@dataclass
class KeptTokens:
    """One image's selection, as :attr:`PrunedModelMixin.flashvlm_history` records it."""

    text_ids: tuple[int, ...]  # the prompt text that guided it (empty when the method reads none)
    num_tokens: int  # N: selectable tokens the image had
    keep_indices: tuple[int, ...]  # kept positions, ascending


@dataclass
class PromptText:
    """The prompt text that guides one image's selection."""

    ids: torch.Tensor  # (L,) long: every prompt token that is not a visual placeholder, in order
    before_image: int  # how many of them come before the prompt's first visual placeholder


def pack_prompt_text(prompt: list[int], not_text: frozenset[int]) -> tuple[int, ...]:
    """A prompt's ``TEXT_IDS_FIELD``: the count of tokens before its first visual
    placeholder (all text), then every token that is not a visual placeholder."""
    first_visual = next((place for place, token in enumerate(prompt) if token in not_text), len(prompt))
    return (first_visual, *(token for token in prompt if token not in not_text))


def per_image_rows(kwargs: dict, field: str, num_images: int) -> list[torch.Tensor] | None:
    """One row of a per-image field for each image (a batch stacks equal rows, lists others); None where absent."""
    value = kwargs.get(field)
    if value is None:
        return None
    rows = list(value.unbind(0)) if isinstance(value, torch.Tensor) else list(value)
    if len(rows) != num_images:
        raise RuntimeError(f"{field} has {len(rows)} rows for {num_images} images")
    return rows


def prompt_text_per_image(kwargs: dict, num_images: int, modality: str = "image") -> list[PromptText | None]:
    """The ``TEXT_IDS_FIELD`` of each image (or item of ``modality``), unpacked; None where absent."""
    rows = per_image_rows(kwargs, item_field(TEXT_IDS_FIELD, modality), num_images)
    if rows is None:
        return [None] * num_images
    return [PromptText(row[1:], int(row[0])) for row in rows]


PIXEL_INPUTS = ("pixel_values", "pixel_values_videos")


def require_pixels(visual_input) -> None:
    """Refuse, in one line, a parsed image or video input that is not pixels: selection needs
    the encoder's saliency, which precomputed embeddings (``image_embeds``...) do not carry."""
    if visual_input["type"] not in PIXEL_INPUTS:
        raise FlashVLMError(
            f"flashvlm selects from pixels; precomputed {visual_input['type']} carry no encoder saliency"
        )


def pack_settings(text: str) -> torch.Tensor:
    """A request's settings JSON as one row of ``SETTINGS_FIELD``: (B,) uint8."""
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


class PrunedModelMixin:
    """Selection for a vLLM multimodal model; the family class gathers the inputs.

    ``flashvlm`` holds the settings (None: the model is stock vLLM, untouched).
    """

    flashvlm: PruningSettings | None

    def init_flashvlm(
        self, settings: PruningSettings | None, served: frozenset[str] = SERVED_REQUIREMENTS, vllm_config=None
    ) -> None:
        self.flashvlm = settings
        #: What the family hands a method: a request's settings are checked against it too.
        self.flashvlm_served = served
        #: The last images' selections, oldest first (read with ``LLM.apply_model``).
        self.flashvlm_history: deque[KeptTokens] = deque(maxlen=HISTORY_LENGTH)
        #: Images' unpruned tower outputs by content (``vision_cache.py``). Off with LoRA: an
        #: adapter may change the tower per request, and the key cannot see which one.
        with_lora = getattr(vllm_config, "lora_config", None) is not None
        megabytes = 0 if settings is None or with_lora else settings.vision_cache_mb
        self.flashvlm_vision = VisionCache(int(megabytes * MIB))

    def load_weights(self, weights):
        """vLLM's, then the vision cache emptied: what it holds was computed with the old weights
        (a reload, or a trainer's weight update through ``load_weights``)."""
        loaded = super().load_weights(weights)
        clear_vision_cache(self)
        return loaded

    def encode_images(
        self,
        tower_inputs: Sequence[torch.Tensor],
        extras: Sequence[Hashable],
        settings: Sequence[PruningSettings],
        run_tower: Callable[[list[int]], list[EncodedImage]],
    ) -> list[EncodedImage]:
        """Each image's unpruned tower output, one tower pass over the images the vision cache
        lacks: ``tower_inputs[i]`` is image ``i``'s tower input, ``extras[i]`` what else its
        output depends on, ``settings[i]`` its request's (what its method reads), and
        ``run_tower(indices)`` encodes those images for their methods. The selection then runs
        per image (:meth:`keep_image_tokens`), with each request's text and settings."""
        requires = [image.selector.requires for image in settings]
        return self.flashvlm_vision.encode(tower_inputs, extras, requires, run_tower)

    def keep_video_tokens(
        self,
        videos: Sequence[torch.Tensor],
        kwargs: dict,
        encode_videos: Callable[[list[torch.Tensor], set[frozenset[str]]], list[EncodedImage]],
        project: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        """What the language model receives for each video, (K', D) each: ``videos[i]`` is video
        ``i``'s (F, 3, H, W) frames, ``encode_videos(videos, requirements)`` encodes some of them
        (one :class:`EncodedImage` each: every frame's tokens in order, then any newline), and the
        budget units follow each request's ``video_budget``, as the HF adapters make them."""
        texts = prompt_text_per_image(kwargs, len(videos), "video")
        settings = self.settings_per_image(kwargs, len(videos), "video")

        def run_tower(chosen: list[int]) -> list[EncodedImage]:
            return encode_videos(
                [videos[video] for video in chosen], {settings[video].selector.requires for video in chosen}
            )

        encoded = self.encode_images(videos, [("video", tuple(video.shape)) for video in videos], settings, run_tower)
        kept = []
        for one, text, own, video in zip(encoded, texts, settings, videos):
            item = one.item
            newlines = 0 if item.is_newline is None else int(item.is_newline.sum())
            per_frame = (item.length - newlines) // len(video)
            device = item.features.device
            item.units = video_units(len(video), per_frame, square_grid(per_frame), device, own.video_budget)
            kept.append(self.keep_image_tokens(item, text, own, one.saliency_kind, one.key_heads, project))
        return tuple(kept)

    def settings_per_image(self, kwargs: dict, num_images: int, modality: str = "image") -> list[PruningSettings]:
        """Each image's (or item of ``modality``'s) settings: its request's own (``SETTINGS_FIELD``),
        else the engine's."""
        rows = per_image_rows(kwargs, item_field(SETTINGS_FIELD, modality), num_images)
        if rows is None:
            return [self.flashvlm] * num_images
        return [self.flashvlm_request_settings(bytes(row.tolist()).decode()) for row in rows]

    def flashvlm_request_settings(self, text: str) -> PruningSettings:
        """A request's settings from their JSON, parsed and checked as the front end did (once per process)."""
        return settings_from_json(text, self.flashvlm_served)

    def embed_text(self, text: PromptText, selector) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Input embeddings (1, L, D) of one image's prompt text, its mask (1, L), and which
        of its tokens precede the first image (1, L; only for ``text_tokens="before_image"``,
        as the HF adapters give it)."""
        language_model = self.get_language_model()
        text_ids = text.ids.to(next(language_model.parameters()).device, torch.long)
        embeds = language_model.embed_input_ids(text_ids)  # (L, D)
        mask = torch.ones(1, text_ids.numel(), dtype=torch.bool, device=embeds.device)
        before_image = None
        if getattr(selector, "text_tokens", "prompt") == "before_image":
            before_image = torch.arange(text_ids.numel(), device=embeds.device)[None, :] < text.before_image
        return embeds.unsqueeze(0), mask, before_image

    def keep_image_tokens(
        self,
        item: VisualItem,
        text: PromptText | None,
        settings: PruningSettings,
        saliency_kind: str,
        key_heads: int | None,
        project: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """What the language model receives for one image, (K', D): the shared pipeline's
        selection (:mod:`flashvlm.pipeline`) with the image's ``settings``, on the image alone,
        as the HF adapters run it, with every raster row's newline kept (vLLM fixed the image's
        placeholder count from its size). Records what the image kept."""
        guide = None
        if "text" in settings.selector.requires:
            if text is None:
                raise RuntimeError(f"the method reads the prompt, but the image came without {TEXT_IDS_FIELD}")
            guide = GuidingText(*self.embed_text(text, settings.selector))
        select_regions([item], settings.selector, settings.budget, guide, saliency_kind, key_heads)
        keep_tokens(item, project, newlines="every_row")
        kept, offset = [], 0
        for unit in item.units:
            kept += (unit.keep_indices + offset).tolist()
            offset += unit.num_tokens
        self.flashvlm_history.append(
            KeptTokens(tuple(text.ids.tolist()) if text is not None else (), offset, tuple(kept))
        )
        return item.sent


def flashvlm_history(model: nn.Module) -> list[KeptTokens]:
    """What a pruned model kept, image by image (for ``LLM.apply_model(flashvlm_history)``)."""
    return list(getattr(model, "flashvlm_history", ()))
