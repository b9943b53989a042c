"""The model-adapter interface: the pruning pipeline, written once over a few family hooks.

An adapter knows one model family: how to run its vision tower up to the feature layer
(with saliency taken from that layer's queries and keys), how to project, where the
prompt's text is, and how the language model receives visual tokens. It knows nothing
about any selection method: it gathers what the method ``requires`` and hands it a
:class:`~flashvlm.selection.SelectionInputs`.

:meth:`ModelAdapter.prune_inputs` is the whole pipeline. A family overrides only its
differences:

- :meth:`~ModelAdapter.visual_items` (required): encode the images/videos and return one
  :class:`VisualItem` each, in placeholder order, with the budget units it selects in;
- :meth:`~ModelAdapter.project`: vision features -> language-model tokens (merging methods);
- :meth:`~ModelAdapter.scoring_positions` and :meth:`~ModelAdapter.pruned_position_ids`:
  positions, 1-D by default (``None``: the model's own), M-RoPE for Qwen;
- :meth:`~ModelAdapter.scoring_kwargs`: what else the ``lm_attention`` pass's decoder gets;
- :meth:`~ModelAdapter.encoder_output`: how the kept tokens go back into the model.

Sequence surgery lives in :mod:`.sequence`, the vision/LM taps in :mod:`.taps`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import FlashVLMError
from ..pipeline import (
    NEWLINES,
    TEXT_TOKENS,
    TILE_BUDGETS,
    VIDEO_BUDGETS,
    GuidingText,
    ImageSelection,
    VisualItem,
    keep_tokens,
    select_regions,
    video_units,
)
from ..selection import Budget, TokenSelector
from ..selection.base import check_choice
from .sequence import (
    pad_token_id,
    placeholder_rows,
    prompt_tensors,
    question_token_mask,
    rebuild_model_kwargs,
    text_embeddings,
)
from .taps import run_until_tap, tap_last_token_attention


@dataclass(frozen=True)
class FamilySupport:
    """How a family is pruned, in words: the README's "Supported models" row and the
    methods x families table are generated from it."""

    name: str  # what users call the family, e.g. "LLaVA-1.5"
    saliency: str  # where encoder saliency comes from
    budget_unit: str  # what one budget counts
    positions: str  # what positions the pruned prompt gets
    #: Selection inputs the family cannot serve (``flashvlm.selection.REQUIREMENTS``).
    lacks: frozenset[str] = frozenset()


@dataclass
class PrunedInputs:
    """Model keyword arguments with only the kept visual tokens, and what was kept."""

    model_kwargs: dict[str, Any]
    images: list[ImageSelection] = field(default_factory=list)
    original_length: int = 0  # sequence length before pruning
    pruned_length: int = 0  # sequence length after pruning (with padding)


class ModelAdapter(ABC):
    """One model family. Subclasses list the Hugging Face classes they serve."""

    #: Class names of the Hugging Face models this adapter serves.
    architectures: ClassVar[tuple[str, ...]] = ()
    #: Arguments that carry pixels: their presence means there is something to prune.
    pixel_arguments: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: Arguments that only feed the vision side (or positions recomputed): consumed here.
    vision_only_kwargs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: "cls" (a CLS row) or "received" (attention each token receives): what saliency is.
    saliency_kind: str = "received"
    #: Heads the saliency layer's keys split into.
    key_heads: int | None = None
    #: The family in words (docs tables are generated from it).
    support: ClassVar[FamilySupport]

    def __init__(
        self,
        model: nn.Module,
        video_budget: str = "per_frame",
        tokenizer=None,
        newlines: str = "kept_rows",
        tile_budget: str = "per_image",
    ) -> None:
        check_choice("video_budget", video_budget, VIDEO_BUDGETS)
        check_choice("newlines", newlines, NEWLINES)
        check_choice("tile_budget", tile_budget, TILE_BUDGETS)
        self.model = model
        self.video_budget = video_budget
        self.newlines = newlines
        #: How an image of tiles shares its budget (InternVL, Idefics3/SmolVLM; others have no tiles).
        self.tile_budget = tile_budget
        #: The model's tokenizer (or processor): needed to find the question's tokens.
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.core = model.model
        config = model.config
        #: Placeholder token id of each kind of visual input the family takes.
        self.token_ids = {"image": config.image_token_id}
        if "pixel_values_videos" in self.pixel_arguments:
            self.token_ids["video"] = config.video_token_id

    @classmethod
    def serves(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.architectures

    @property
    def language_model(self) -> nn.Module:
        """The decoder that runs the prefill (timed by benchmarks and the CLI)."""
        return self.model.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder (timed by benchmarks)."""
        return self.core.vision_tower

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder layers, each with a ``self_attn`` module."""
        return self.language_model.layers

    def has_visual_input(self, model_kwargs: dict[str, Any]) -> bool:
        """Whether these forward/generate arguments carry visual tokens to prune."""
        return any(model_kwargs.get(name) is not None for name in self.pixel_arguments)

    def video_units(
        self,
        num_frames: int,
        per_frame: int,
        frame_grid: tuple[int, int] | None,
        device: torch.device,
        video_grid: tuple[int, int] | None = None,
    ) -> list[ImageSelection]:
        """Budget units of one video of ``num_frames`` frames of ``per_frame`` tokens: one unit
        per frame laid out as ``frame_grid`` (``video_budget="per_frame"``), or one for the
        whole video (laid out as ``video_grid``, if it has a 2-D layout)."""
        return video_units(num_frames, per_frame, frame_grid, device, self.video_budget, video_grid)

    # -- the hooks a family overrides ---------------------------------------------------------
    @abstractmethod
    def visual_items(self, model_kwargs: dict[str, Any], needs: frozenset[str]) -> list[VisualItem]:
        """Encode every image and video: one item each, images first, each kind in placeholder
        order, with its budget units and what ``needs`` asks for (``tokens`` are required
        when ``needs`` has "projected" or "lm_attention")."""

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector on (K, C) vision features -> (K, D) language-model tokens."""
        return self.core.multi_modal_projector(features)

    def scoring_positions(self, model_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """Positions of the unpruned prompt for the ``lm_attention`` pass; None: 1-D."""
        return None

    def pruned_position_ids(
        self, model_kwargs: dict[str, Any], keep: torch.Tensor, new_mask: torch.Tensor
    ) -> torch.Tensor | None:
        """``position_ids`` for the pruned prompt (keep: (B, L), new_mask: (B, L')); None:
        the model's own contiguous positions over the shortened prompt."""
        return None

    def scoring_kwargs(
        self, model_kwargs: dict[str, Any], inputs_embeds: torch.Tensor, by_kind: dict[str, list[VisualItem]]
    ) -> dict[str, Any]:
        """Further language-model arguments for the ``lm_attention`` pass over the unpruned
        prompt (inputs_embeds: (B, L, D)), so it sees what the model's own forward gives its
        decoder (Gemma 3's image mask, Qwen3-VL's DeepStack features)."""
        return {}

    def encoder_output(self, kind: str, items: list[VisualItem]) -> BaseModelOutputWithPooling:
        """What the model's forward takes as ``mm_encoder_outputs[kind]``: a list of (K_i, D)."""
        return BaseModelOutputWithPooling(pooler_output=[item.sent for item in items])

    # -- the pipeline -----------------------------------------------------------------------
    def prune_inputs(
        self,
        model_kwargs: dict[str, Any],
        selector: TokenSelector,
        budget: Budget,
        questions: list[str | None] | None = None,
    ) -> PrunedInputs:
        """Run the vision side, select, and return arguments for the unpruned-token-free forward.

        ``questions`` (one per batch row) are the user's own words, for a method whose
        ``text_tokens`` is "question".
        """
        input_ids, attention_mask = prompt_tensors(model_kwargs)
        needs = selector.requires
        placeholder_ids = list(self.token_ids.values())
        # Gradients reach the vision side only when training asks for them.
        with torch.set_grad_enabled(self.model.training and torch.is_grad_enabled()):
            items = self.visual_items(model_kwargs, needs)
            by_kind = {kind: [item for item in items if item.kind == kind] for kind in self.token_ids}
            by_kind = {kind: kind_items for kind, kind_items in by_kind.items() if kind_items}
            for kind, kind_items in by_kind.items():
                rows = placeholder_rows(input_ids, self.token_ids[kind], [item.length for item in kind_items], kind)
                for item, row in zip(kind_items, rows):
                    item.batch_index = row
                    for unit in item.units:
                        unit.batch_index = row
            if "lm_attention" in needs:
                self._score_in_language_model(by_kind, model_kwargs, selector.lm_attention_layer)
            text = self.prompt_text(input_ids, attention_mask, selector, questions)
            select_regions(items, selector, budget, text, self.saliency_kind, self.key_heads)
            for item in items:
                keep_tokens(item, self.project, self.newlines)

        # Existing padding goes too: rows are re-padded to the longest pruned row.
        keep = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(placeholder_ids, device=input_ids.device))
        outputs = {}
        for kind, kind_items in by_kind.items():
            keep[input_ids == self.token_ids[kind]] = torch.cat([item.keep for item in kind_items]).to(keep.device)
            outputs[kind] = self.encoder_output(kind, kind_items)
        pruned_kwargs, new_mask = rebuild_model_kwargs(
            model_kwargs, keep, self.vision_only_kwargs, pad_token_id(self.model), outputs
        )
        position_ids = self.pruned_position_ids(model_kwargs, keep, new_mask)
        if position_ids is not None:
            pruned_kwargs["position_ids"] = position_ids
        records = [unit for item in items for unit in item.units]
        return PrunedInputs(pruned_kwargs, records, input_ids.shape[1], new_mask.shape[1])

    def prompt_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, selector: TokenSelector, questions
    ) -> GuidingText | None:
        """Embeddings (B, L_text, D) and mask (B, L_text) of the text that guides ``selector``:
        every prompt token that is neither padding nor a visual placeholder, wherever the
        images sit, or (``text_tokens="question"``) only the question's tokens; and, packed
        the same way, which of them precede the row's first visual placeholder (B, L_text;
        only for ``text_tokens="before_image"``, else None). None when the method needs no text."""
        if "text" not in selector.requires:
            return None
        placeholder_ids = torch.tensor(list(self.token_ids.values()), device=input_ids.device)
        is_placeholder = torch.isin(input_ids, placeholder_ids)
        is_text = attention_mask.bool() & ~is_placeholder
        text_tokens = getattr(selector, "text_tokens", "prompt")
        check_choice("text_tokens", text_tokens, TEXT_TOKENS)
        if text_tokens == "question":
            if questions is None or self.tokenizer is None:
                raise FlashVLMError(
                    f"method {selector.name!r} with text_tokens='question' needs the question text and the tokenizer: "
                    "flashvlm.prune(model, budget, method, tokenizer=processor), then call generate/forward with "
                    "question=<the user's words> (one string per batch row)"
                )
            rows = [questions] if isinstance(questions, str) else list(questions)
            is_text &= question_token_mask(self.tokenizer, input_ids, attention_mask, rows, placeholder_ids)
        text_embeds, text_mask = text_embeddings(self.model.get_input_embeddings(), input_ids, is_text)
        if text_tokens != "before_image":
            return GuidingText(text_embeds, text_mask)
        # Packing keeps each row's text in order, so the tokens before the first image are
        # the first (is_text & before-image).sum() places of its packed row.
        before_count = (is_text & (is_placeholder.cumsum(dim=1) == 0)).sum(dim=1)  # (B,)
        text_before_image = torch.arange(text_mask.shape[1], device=input_ids.device)[None, :] < before_count[:, None]
        return GuidingText(text_embeds, text_mask, text_before_image)

    def _score_in_language_model(self, by_kind: dict[str, list[VisualItem]], model_kwargs: dict, layer: int) -> None:
        """Fill every item's ``lm_attention``: one pass over the unpruned prompt, every token
        (newlines included) where the model puts it."""
        input_ids, attention_mask = prompt_tensors(model_kwargs)
        sent = {self.token_ids[kind]: torch.cat([item.tokens for item in items]) for kind, items in by_kind.items()}
        positions = self.scoring_positions(model_kwargs)
        scores = self.visual_token_attention(input_ids, attention_mask, sent, layer, positions, model_kwargs, by_kind)
        for kind, items in by_kind.items():
            for item, item_scores in zip(items, scores[self.token_ids[kind]].split([item.length for item in items])):
                item.lm_attention = item_scores

    # -- the language-model tap ----------------------------------------------------------------
    def visual_token_attention(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_tokens: dict[int, torch.Tensor],
        layer: int,
        position_ids: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        by_kind: dict[str, list[VisualItem]] | None = None,
    ) -> dict[int, torch.Tensor]:
        """The ``lm_attention`` input: each row's last-token attention to its visual tokens.

        input_ids, attention_mask: (B, L). ``visual_tokens`` maps a placeholder token id to
        the (T, D) tokens that fill its placeholders, in placeholder order (row-major over
        the batch, newline tokens included where the model sends them). Builds the full,
        unpruned input embeddings and runs the language model through its first ``layer``
        layers, where only the attention row of each row's last real token is computed (from
        that layer's own rotated queries and keys, mean over heads); the earlier layers keep
        their attention implementation. ``position_ids`` default to the ones ``generate``
        uses (count of real tokens so far); models with other positions (M-RoPE) pass their
        own. With the prompt's ``model_kwargs`` and its items ``by_kind``, the pass also
        gets the family's :meth:`scoring_kwargs`. Returns, per placeholder id, (T,) float32
        in the same order.
        """
        num_layers = len(self.decoder_layers)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers:
            raise FlashVLMError(
                f"language-model layer {layer!r} is out of range: this language model has {num_layers} layers (use 1..{num_layers})"
            )
        placeholders = {token_id: input_ids == token_id for token_id in visual_tokens}  # (B, L) each
        is_visual = torch.stack(list(placeholders.values())).any(dim=0)
        # Placeholder ids may lie outside the embedding table: embed a valid id there, then overwrite.
        embeds = self.model.get_input_embeddings()(input_ids.masked_fill(is_visual, 0))  # (B, L, D)
        for token_id, is_placeholder in placeholders.items():
            embeds[is_placeholder] = visual_tokens[token_id].to(embeds.dtype)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        decoder_kwargs = dict(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)
        if model_kwargs is not None:
            decoder_kwargs.update(self.scoring_kwargs(model_kwargs, embeds, by_kind))
        with tap_last_token_attention(self.decoder_layers[layer - 1].self_attn, attention_mask) as tap:
            run_until_tap(self.language_model, use_cache=False, **decoder_kwargs)
        return {token_id: tap.attention[is_placeholder] for token_id, is_placeholder in placeholders.items()}
