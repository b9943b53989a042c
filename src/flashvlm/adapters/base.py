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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import FlashVLMError
from ..selection import Budget, SelectionInputs, TokenSelector, resolve_budget
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

#: Which prompt tokens guide a text-guided method (its ``text_tokens``): the whole prompt
#: but the visual placeholders (the LLaVA release's default), only the user's question, or
#: only the text before the first visual placeholder (the Qwen release).
TEXT_TOKENS = ("prompt", "question", "before_image")

#: How a video's budget is counted: the budget applies to each frame separately, or to the
#: whole video with its frames selected jointly (a frame with more relevant tokens keeps more).
VIDEO_BUDGETS = ("per_frame", "per_video")

#: Which newline tokens (LLaVA-NeXT/OneVision raster rows; outside the budget) stay: the
#: newline of each row that keeps a token, or every row's. With "every_row" an image's
#: token count follows from its size alone, as vLLM needs (it fixes each image's
#: placeholder count before the encoder runs; see docs/vllm.md).
NEWLINES = ("kept_rows", "every_row")


@dataclass
class TokenRegion:
    """Tokens of one item that a method selects among together: a view, a frame, a video."""

    positions: torch.Tensor  # (N,) long: the item's tokens of this region, ascending
    grid_shape: tuple[int, int] | None = None  # (rows, cols) when the region is a raster
    budget: Budget | None = None  # what the method keeps of it (the unit's budget, or its share)
    chosen: torch.Tensor | None = None  # (K,) after selection: kept places among ``positions``
    merged: torch.Tensor | None = None  # (K, C) after selection: a merging method's features


@dataclass
class ImageSelection:
    """One budget unit (an image, a video frame or a whole video) and what was kept of it.

    ``keep_indices`` index the unit's selectable tokens in the order the language model
    receives them; tokens outside the budget (LLaVA-NeXT/OneVision newline tokens) are
    not counted in ``num_tokens``. A unit of several regions (an AnyRes image's base view
    and crops) shares its budget among them in proportion to their sizes.
    """

    batch_index: int  # row of the batch the unit belongs to
    num_tokens: int  # N: selectable visual tokens the unit had
    keep_indices: torch.Tensor  # (K,) kept token positions, ascending
    grid_shape: tuple[int, int] | None = None  # (rows, cols) of the token raster
    kind: str = "image"  # "image", "frame" (per-frame video budget) or "video"
    regions: list[TokenRegion] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, kind: str, regions: list[TokenRegion]) -> ImageSelection:
        """A unit over ``regions``, before selection (nothing kept yet)."""
        grid = regions[0].grid_shape if len(regions) == 1 else None
        num_tokens = sum(region.positions.numel() for region in regions)
        return cls(0, num_tokens, torch.zeros(0, dtype=torch.long), grid, kind, regions)

    @property
    def num_kept(self) -> int:
        return int(self.keep_indices.numel())


#: Per-token fields of a :class:`VisualItem` that are sliced, packed and pruned together.
TOKEN_FIELDS = ("features", "tokens", "saliency", "keys", "lm_attention")


@dataclass
class VisualItem:
    """One image or video as the language model receives it, and what a method may read of it.

    Per-token tensors share their leading dimensions: (L, ...) over the item's L
    placeholder tokens in the language model's order. (A family may use the same record
    for a stack of tower inputs, (P, n, ...), before arranging it into items.)
    """

    kind: str  # "image" or "video": which placeholder and encoder output it fills
    features: torch.Tensor  # (L, C) vision features the projector consumes (zeros outside the budget)
    tokens: torch.Tensor | None = None  # (L, D) projected; None: only the kept rows get projected
    saliency: torch.Tensor | None = None  # (L,) float32 encoder saliency
    keys: torch.Tensor | None = None  # (L, C_k) attention keys of the saliency layer
    lm_attention: torch.Tensor | None = None  # (L,) the last prompt token's attention in the LM
    #: Further per-token outputs the model consumes, pruned with the same keep mask
    #: (Qwen3-VL's DeepStack features: name -> (L, D)).
    side_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Tokens outside the budget (LLaVA-NeXT newlines): (L,) bool, kept when a token of
    #: the same ``row_of`` is kept.
    is_newline: torch.Tensor | None = None
    row_of: torch.Tensor | None = None  # (L,) long: the raster row a token belongs to; -1 for none
    units: list[ImageSelection] = field(default_factory=list)  # the budget units, in order
    batch_index: int = 0  # row of the batch whose prompt holds the item
    keep: torch.Tensor | None = None  # (L,) bool, after selection: the tokens that stay
    sent: torch.Tensor | None = None  # (K', D), after selection: the tokens the language model gets
    sent_side_outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # after selection: name -> (K', D)

    @property
    def length(self) -> int:
        return self.features.shape[-2]

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> VisualItem:
        """A copy with ``function`` applied to every per-token tensor present."""
        changed = {name: function(getattr(self, name)) for name in TOKEN_FIELDS if getattr(self, name) is not None}
        changed["side_outputs"] = {name: function(value) for name, value in self.side_outputs.items()}
        return replace(self, **changed)


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
        self, model: nn.Module, video_budget: str = "per_frame", tokenizer=None, newlines: str = "kept_rows"
    ) -> None:
        check_choice("video_budget", video_budget, VIDEO_BUDGETS)
        check_choice("newlines", newlines, NEWLINES)
        self.model = model
        self.video_budget = video_budget
        self.newlines = newlines
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
        positions = torch.arange(num_frames * per_frame, device=device)  # (T * per_frame,)
        if self.video_budget == "per_frame":
            return [
                ImageSelection.of("frame", [TokenRegion(frame, frame_grid)]) for frame in positions.split(per_frame)
            ]
        return [ImageSelection.of("video", [TokenRegion(positions, video_grid)])]

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
            self._select(items, selector, budget, text)
            for item in items:
                self._keep_tokens(item)

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
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Embeddings (B, L_text, D) and mask (B, L_text) of the text that guides ``selector``:
        every prompt token that is neither padding nor a visual placeholder, wherever the
        images sit, or (``text_tokens="question"``) only the question's tokens; and, packed
        the same way, which of them precede the row's first visual placeholder (B, L_text;
        only for ``text_tokens="before_image"``, else None). (None, None, None) when the
        method needs no text."""
        if "text" not in selector.requires:
            return None, None, None
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
            return text_embeds, text_mask, None
        # Packing keeps each row's text in order, so the tokens before the first image are
        # the first (is_text & before-image).sum() places of its packed row.
        before_count = (is_text & (is_placeholder.cumsum(dim=1) == 0)).sum(dim=1)  # (B,)
        text_before_image = torch.arange(text_mask.shape[1], device=input_ids.device)[None, :] < before_count[:, None]
        return text_embeds, text_mask, text_before_image

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

    def _select(self, items: list[VisualItem], selector: TokenSelector, budget: Budget, text) -> None:
        """Run ``selector`` on every region, batching regions that share a token count, budget
        and raster (so grid-aware methods keep their grid); fills each unit's ``keep_indices``
        and each region's ``chosen`` positions and replacement ``merged`` features."""
        text_embeds, text_mask, text_before_image = text
        groups: dict[tuple[int, Budget, tuple[int, int] | None], list[tuple[VisualItem, TokenRegion]]] = {}
        for item in items:
            for unit in item.units:
                for region, share in zip(unit.regions, region_budgets(unit, budget, selector.keeps_all)):
                    region.budget = share
                    region.chosen = torch.zeros(0, dtype=torch.long, device=region.positions.device)
                    if not (isinstance(share, int) and share == 0):
                        key = (region.positions.numel(), share, region.grid_shape)
                        groups.setdefault(key, []).append((item, region))
        for (_, share, grid_shape), members in groups.items():

            def stacked(name: str, members=members) -> torch.Tensor | None:
                if getattr(members[0][0], name) is None:
                    return None
                return torch.stack([getattr(item, name)[region.positions] for item, region in members])

            inputs = SelectionInputs(
                features=stacked("features"),
                saliency=stacked("saliency"),
                saliency_kind=self.saliency_kind,
                projected=stacked("tokens"),
                keys=stacked("keys"),
                key_heads=self.key_heads,
                grid_shape=grid_shape,
                lm_attention=stacked("lm_attention"),
            )
            if text_embeds is not None:
                rows = torch.tensor([item.batch_index for item, _ in members], device=text_embeds.device)
                inputs.text_embeds, inputs.text_mask = text_embeds[rows], text_mask[rows]
                if text_before_image is not None:
                    inputs.text_before_image = text_before_image[rows]
            selection = selector(inputs, share)
            for row, (_, region) in enumerate(members):
                region.chosen = selection.indices[row]
                region.merged = None if selection.features is None else selection.features[row]
        for item in items:
            for unit in item.units:
                offsets = torch.tensor([0, *[r.positions.numel() for r in unit.regions]]).cumsum(0)
                unit.keep_indices = torch.cat(
                    [region.chosen.cpu() + offset for region, offset in zip(unit.regions, offsets.tolist())]
                )

    def _keep_tokens(self, item: VisualItem) -> None:
        """Fill ``item.keep`` (L,) and ``item.sent`` (K', D) from its regions' choices."""
        device = item.features.device
        keep = torch.zeros(item.length, dtype=torch.bool, device=device)
        merged_at, merged = [], []
        for unit in item.units:
            for region in unit.regions:
                chosen = region.positions[region.chosen.to(region.positions.device)]
                keep[chosen] = True
                if region.merged is not None:
                    merged_at.append(chosen)
                    merged.append(region.merged)
        if item.is_newline is not None and self.newlines == "every_row":
            keep |= item.is_newline
        elif item.is_newline is not None:
            # A row's newline stays when the row keeps a token, so the LM still sees where it ends.
            rows_kept = item.row_of[keep & ~item.is_newline]
            keep |= item.is_newline & torch.isin(item.row_of, rows_kept)
        if item.tokens is None:
            # Project only what stays: merged features replace the originals at their positions.
            features = item.features
            if merged:
                features = features.clone()
                features[torch.cat(merged_at)] = torch.cat(merged).to(features.dtype)
            item.sent = self.project(features[keep])
        else:
            tokens = item.tokens
            if merged:
                tokens = tokens.clone()
                for positions, features in zip(merged_at, merged):
                    tokens[positions] = self.project(features).to(tokens.dtype)
            item.sent = tokens[keep]
        item.keep = keep
        item.sent_side_outputs = {name: value[keep] for name, value in item.side_outputs.items()}

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


def region_budgets(unit: ImageSelection, budget: Budget, keeps_all: bool) -> list[Budget]:
    """The budget of each region of ``unit``: the whole budget for a single region, or, for
    the views of one image, ``K`` split in proportion to their token counts (the last view
    takes the rest). A method that keeps every token gets each region whole: a small ``K``
    split in proportion may round a region's share to 0, which would drop it."""
    if keeps_all:
        return [region.positions.numel() for region in unit.regions]
    if len(unit.regions) == 1:
        return [budget]
    num_keep = resolve_budget(budget, unit.num_tokens)
    shares, assigned = [], 0
    for place, region in enumerate(unit.regions):
        last = place == len(unit.regions) - 1
        share = num_keep - assigned if last else round(num_keep * region.positions.numel() / unit.num_tokens)
        shares.append(share)
        assigned += share
    return shares
