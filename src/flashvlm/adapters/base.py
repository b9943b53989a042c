"""The model-adapter interface and the sequence surgery every adapter shares.

An adapter knows one model family: how to run its vision tower up to the feature
layer (with saliency taken from that layer's queries and keys), how to project, where
the prompt's text is, and how the language model receives visual tokens. It knows
nothing about any selection method: it gathers what the method ``requires`` and hands
it a :class:`~flashvlm.selection.SelectionInputs`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AttentionInterface

from ..errors import FlashVLMError
from ..selection import Budget, SelectionInputs, TokenSelector
from ..selection.base import check_choice

#: How a video's budget is counted: the budget applies to each frame separately, or to the
#: whole video with its frames selected jointly (a frame with more relevant tokens keeps more).
VIDEO_BUDGETS = ("per_frame", "per_video")


@dataclass
class ImageSelection:
    """What happened to one budget unit (an image, a video frame or a whole video).

    ``keep_indices`` index the unit's selectable tokens in the order the language model
    receives them; tokens outside the budget (LLaVA-NeXT/OneVision newline tokens) are
    not counted in ``num_tokens``.
    """

    batch_index: int  # row of the batch the unit belongs to
    num_tokens: int  # N: selectable visual tokens the unit had
    keep_indices: torch.Tensor  # (K,) kept token positions, ascending
    grid_shape: tuple[int, int] | None = None  # (rows, cols) of the token raster
    kind: str = "image"  # "image", "frame" (per-frame video budget) or "video"

    @property
    def num_kept(self) -> int:
        return int(self.keep_indices.numel())


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

    def __init__(self, model: nn.Module, video_budget: str = "per_frame") -> None:
        check_choice("video_budget", video_budget, VIDEO_BUDGETS)
        self.model = model
        self.video_budget = video_budget

    @classmethod
    def serves(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.architectures

    @property
    def language_model(self) -> nn.Module:
        """The decoder that runs the prefill (timed by benchmarks and the CLI)."""
        return self.model.model.language_model

    @abstractmethod
    def has_visual_input(self, model_kwargs: dict[str, Any]) -> bool:
        """Whether these forward/generate arguments carry visual tokens to prune."""

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder layers, each with a ``self_attn`` module."""
        return self.language_model.layers

    @abstractmethod
    def prune_inputs(self, model_kwargs: dict[str, Any], selector: TokenSelector, budget: Budget) -> PrunedInputs:
        """Run the vision side, select, and return arguments for the unpruned-token-free forward."""

    def visual_token_attention(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_tokens: dict[int, torch.Tensor],
        layer: int,
        position_ids: torch.Tensor | None = None,
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
        own. Returns, per placeholder id, (T,) float32 in the same order.
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
        with tap_last_token_attention(self.decoder_layers[layer - 1].self_attn, attention_mask) as tap:
            run_until_tap(
                self.language_model,
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        return {token_id: tap.attention[is_placeholder] for token_id, is_placeholder in placeholders.items()}


@dataclass
class VisualUnit:
    """The tokens that share one budget, as a method sees them (one row of :class:`SelectionInputs`)."""

    batch_index: int  # row of the batch whose prompt guides the selection
    budget: Budget  # what to keep of this unit (an int 0 keeps nothing)
    features: torch.Tensor  # (N, C) vision features the projector consumes
    projected: torch.Tensor | None = None  # (N, D) projector output
    saliency: torch.Tensor | None = None  # (N,) encoder saliency
    keys: torch.Tensor | None = None  # (N, C_k) attention keys of the saliency layer
    grid_shape: tuple[int, int] | None = None  # (rows, cols) when the tokens form a raster
    lm_attention: torch.Tensor | None = None  # (N,) last prompt token's attention inside the LM

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]


@dataclass
class UnitChoice:
    """What a method kept of one :class:`VisualUnit`."""

    indices: torch.Tensor  # (K,) kept positions, ascending
    features: torch.Tensor | None = None  # (K, C) replacement features (merging methods), or None


def select_units(
    units: list[VisualUnit],
    selector: TokenSelector,
    saliency_kind: str | None,
    text_embeds: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    key_heads: int | None = None,
) -> list[UnitChoice]:
    """Run ``selector`` on every unit, batching the units that share a token count and budget.

    text_embeds (B, L, D) and text_mask (B, L) hold each batch row's prompt text; a unit
    is guided by its own row's. ``key_heads`` is how many heads the units' keys split
    into. Returns one :class:`UnitChoice` per unit, in order.
    """
    choices: list[UnitChoice | None] = [None] * len(units)
    # Units of one group share N, budget and raster shape, so grid-aware methods keep their grid.
    groups: dict[tuple[int, Budget, tuple[int, int] | None], list[int]] = {}
    for position, unit in enumerate(units):
        if isinstance(unit.budget, int) and unit.budget == 0:
            empty = torch.zeros(0, dtype=torch.long, device=unit.features.device)
            choices[position] = UnitChoice(empty)
        else:
            groups.setdefault((unit.num_tokens, unit.budget, unit.grid_shape), []).append(position)

    def stacked(name: str, members: list[VisualUnit]) -> torch.Tensor | None:
        values = [getattr(unit, name) for unit in members]
        return None if values[0] is None else torch.stack(values)

    for (_, budget, grid_shape), positions in groups.items():
        members = [units[position] for position in positions]
        inputs = SelectionInputs(
            features=stacked("features", members),
            saliency=stacked("saliency", members),
            saliency_kind=saliency_kind,
            projected=stacked("projected", members),
            keys=stacked("keys", members),
            key_heads=key_heads,
            grid_shape=grid_shape,
            lm_attention=stacked("lm_attention", members),
        )
        if text_embeds is not None:
            rows = torch.tensor([unit.batch_index for unit in members], device=text_embeds.device)
            inputs.text_embeds, inputs.text_mask = text_embeds[rows], text_mask[rows]
        selection = selector(inputs, budget)
        for place, position in enumerate(positions):
            features = None if selection.features is None else selection.features[place]
            choices[position] = UnitChoice(selection.indices[place], features)
    return choices


def require_argument(model_kwargs: dict[str, Any], name: str, needed_by: str) -> Any:
    """``model_kwargs[name]``, or a :class:`FlashVLMError` saying which input needs it."""
    value = model_kwargs.get(name)
    if value is None:
        raise FlashVLMError(f"{needed_by} needs {name} alongside it (as the model's processor returns them)")
    return value


def prompt_tensors(model_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (all ones when not given), both (B, L)."""
    input_ids = model_kwargs.get("input_ids")
    if input_ids is None:
        raise FlashVLMError("flashvlm needs input_ids (not only inputs_embeds) to find the visual placeholders")
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask


def prompt_text(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    placeholder_ids: list[int],
    needs: frozenset[str],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Embeddings (B, L_text, D) and mask (B, L_text) of every prompt token that is neither
    padding nor a visual placeholder, wherever the images sit in the prompt; (None, None)
    when the method's ``needs`` do not include text."""
    if "text" not in needs:
        return None, None
    is_text = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(placeholder_ids, device=input_ids.device))
    return text_embeddings(model.get_input_embeddings(), input_ids, is_text)


def placeholder_rows(input_ids: torch.Tensor, token_id: int, lengths: list[int], what: str) -> list[int]:
    """Batch row of each visual item whose placeholders (``lengths`` tokens each) run row-major.

    Raises :class:`FlashVLMError` when the prompt's placeholder count does not match.
    """
    rows, _ = (input_ids == token_id).nonzero(as_tuple=True)
    if rows.numel() != sum(lengths):
        raise FlashVLMError(
            f"the prompt has {rows.numel()} {what} placeholder tokens, but the {len(lengths)} {what}(s) given "
            f"need {sum(lengths)}: build inputs with the model's processor"
        )
    starts = torch.tensor([0, *lengths[:-1]], dtype=torch.long).cumsum(0)
    return rows.cpu()[starts].tolist() if lengths else []


def pad_token_id(model: nn.Module) -> int:
    """The id new padding gets when pruned rows are re-padded."""
    for config in (model.config, getattr(model.config, "text_config", None), getattr(model, "generation_config", None)):
        pad = getattr(config, "pad_token_id", None) if config is not None else None
        if isinstance(pad, int):
            return pad
    return 0


#: Fill values for per-token arguments when rows are re-padded (0 for any other).
_PER_TOKEN_FILL = {"labels": -100}


def rebuild_model_kwargs(
    model_kwargs: dict[str, Any],
    keep: torch.Tensor,
    vision_only: tuple[str, ...],
    pad_id: int,
    mm_encoder_outputs: dict[str, Any],
) -> tuple[dict[str, Any], torch.Tensor]:
    """Arguments for the language-model-only forward: rows without the dropped placeholders.

    keep: (B, L) bool. Every (B, L) tensor argument is compacted the same way (see
    :func:`compact_sequences`); the ``vision_only`` arguments are consumed. Returns the
    kwargs and the new attention mask (B, L').
    """
    input_ids, attention_mask = prompt_tensors(model_kwargs)
    batch, length = input_ids.shape
    pruned = {k: v for k, v in model_kwargs.items() if k not in vision_only}
    per_token = {
        name: (value, pad_id if name == "input_ids" else _PER_TOKEN_FILL.get(name, 0))
        for name, value in model_kwargs.items()
        if name != "attention_mask" and isinstance(value, torch.Tensor) and value.shape[:2] == (batch, length)
    }
    new_mask, compacted = compact_sequences(keep, attention_mask, per_token)
    pruned.update(compacted)
    pruned["attention_mask"] = new_mask
    pruned["mm_encoder_outputs"] = mm_encoder_outputs
    return pruned, new_mask


def text_embeddings(
    embedding: nn.Module, input_ids: torch.Tensor, text_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings of each row's text tokens, packed to the left.

    input_ids, text_mask: (B, L). Returns embeds (B, L_text, D) and mask (B, L_text),
    where L_text is the most text tokens any row has, so similarity costs O(N * L_text)
    rather than O(N * L) with all the image placeholders.
    """
    counts = text_mask.sum(dim=1)  # (B,)
    width = max(int(counts.max()), 1)
    # A stable sort of "is not text" brings each row's text positions to the front, in order.
    order = (~text_mask).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # (B, L_text)
    packed_mask = torch.arange(width, device=input_ids.device)[None, :] < counts[:, None]
    packed_ids = input_ids.gather(1, order).masked_fill(~packed_mask, 0)
    return embedding(packed_ids), packed_mask


def padding_side(attention_mask: torch.Tensor) -> str:
    """'right' if any row ends in padding, else 'left' (the generation convention)."""
    if attention_mask.shape[1] and bool((attention_mask[:, -1] == 0).any()):
        return "right"
    return "left"


def compact_sequences(
    keep: torch.Tensor,
    attention_mask: torch.Tensor,
    per_token: dict[str, tuple[torch.Tensor, int]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Remove the positions where ``keep`` is False from every row (padding included), then re-pad.

    keep, attention_mask: (B, L). ``per_token`` maps names to ((B, L, ...) tensor, fill
    value for new padding). Rows shrink by different amounts, so they are re-padded to
    the longest on the side the input was padded on (left unless rows end in padding).
    Returns the new attention mask (B, L') and the compacted tensors.
    """
    batch, _ = keep.shape
    lengths = keep.sum(dim=1)  # (B,)
    new_length = int(lengths.max())
    offsets = new_length - lengths if padding_side(attention_mask) == "left" else torch.zeros_like(lengths)
    destination = offsets[:, None] + keep.long().cumsum(dim=1) - 1  # (B, L), valid where keep
    rows, columns = keep.nonzero(as_tuple=True)
    targets = destination[rows, columns]

    def compact(tensor: torch.Tensor, fill: int | float) -> torch.Tensor:
        out = tensor.new_full((batch, new_length, *tensor.shape[2:]), fill)
        out[rows, targets] = tensor[rows, columns]
        return out

    new_mask = compact(attention_mask, 0)
    return new_mask, {name: compact(tensor, fill) for name, (tensor, fill) in per_token.items()}


class _StopForward(Exception):
    """Raised inside a hook to end a vision forward once the needed layer has run."""


@dataclass
class LayerTap:
    """What :func:`tap_vision_layer` captured from one encoder layer."""

    output: torch.Tensor | None = None  # (B, S, C) the layer's output hidden states
    queries: torch.Tensor | None = None  # (B, S, C) q_proj output of the layer
    keys: torch.Tensor | None = None  # (B, S, C) k_proj output of the layer


@contextmanager
def tap_vision_layer(layer: nn.Module, capture_qk: bool, stop_after: bool):
    """Capture one encoder layer's output (and its q/k projections) during a forward.

    With ``stop_after`` the forward is cut short after this layer: the later layers'
    outputs are not used, so they need not run. Use :func:`run_until_tap` to call.
    """
    tap = LayerTap()
    handles = []

    def keep_output(_module, _args, output):
        tap.output = output[0] if isinstance(output, tuple) else output
        if stop_after:
            raise _StopForward

    handles.append(layer.register_forward_hook(keep_output))
    if capture_qk:
        attention = layer.self_attn
        handles.append(attention.q_proj.register_forward_hook(lambda _m, _a, out: setattr(tap, "queries", out)))
        handles.append(attention.k_proj.register_forward_hook(lambda _m, _a, out: setattr(tap, "keys", out)))
    try:
        yield tap
    finally:
        for handle in handles:
            handle.remove()


def run_until_tap(forward, *args, **kwargs) -> None:
    """Call ``forward``; a :class:`_StopForward` from a tap ends it normally."""
    try:
        forward(*args, **kwargs)
    except _StopForward:
        pass


def resolve_hidden_state_layer(feature_layer: int, num_layers: int) -> int:
    """Index of the encoder layer whose output is ``hidden_states[feature_layer]``.

    hidden_states[0] is the embedding output, hidden_states[i] the output of layer i-1.
    """
    hidden_index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= hidden_index <= num_layers:
        raise FlashVLMError(
            f"vision_feature_layer {feature_layer} does not name an encoder layer's output "
            f"(the tower has {num_layers} layers: use 1..{num_layers} or -{num_layers}..-1)"
        )
    return hidden_index - 1


#: Attention implementation name under which :func:`tap_last_token_attention` runs one layer.
_LAST_TOKEN_ROW = "flashvlm_last_token_row"


@dataclass
class LastTokenTap:
    """What :func:`tap_last_token_attention` captured."""

    key_mask: torch.Tensor  # (B, L) bool, keys that are real tokens
    attention: torch.Tensor | None = None  # (B, L) float32, the last real token's attention, mean over heads


def _last_token_row(module: nn.Module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention "implementation" for one tapped layer: compute one row, then end the forward.

    query: (B, H, L, d) and key: (B, H_kv, L, d), already rotated. The causal mask allows
    the last real token every key, so only padding is masked (from the 2-D mask).
    """
    tap: LastTokenTap = module._flashvlm_last_token_tap
    key_mask = tap.key_mask.to(query.device)
    batch, heads, _, head_dim = query.shape
    last = key_mask.shape[1] - 1 - key_mask.flip(1).long().argmax(dim=1)  # (B,) last real position
    last_query = query[torch.arange(batch, device=query.device), :, last].float()  # (B, H, d)
    keys = key.float().repeat_interleave(heads // key.shape[1], dim=1)  # (B, H, L, d)
    scale = head_dim**-0.5 if scaling is None else scaling
    logits = torch.einsum("bhd,bhld->bhl", last_query, keys) * scale
    logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    tap.attention = torch.softmax(logits, dim=-1).mean(dim=1)
    raise _StopForward


AttentionInterface.register(_LAST_TOKEN_ROW, _last_token_row)


@contextmanager
def tap_last_token_attention(attention: nn.Module, attention_mask: torch.Tensor):
    """Make one attention module compute only its last-token attention row and stop the forward.

    Only this module sees the change: it gets a copy of its config naming
    :data:`_LAST_TOKEN_ROW` as its attention implementation, restored on exit, so every
    other layer keeps SDPA/FlashAttention. Works for any Hugging Face attention module that
    dispatches through ``ALL_ATTENTION_FUNCTIONS`` (standard softmax attention; sliding
    windows and logit soft-capping are not modelled).
    """
    tap = LastTokenTap(key_mask=attention_mask.bool())
    shared_config = attention.config
    tapped_config = copy.copy(shared_config)
    # Set the stored value directly: the public setter would recurse into (shared) sub-configs.
    tapped_config._attn_implementation_internal = _LAST_TOKEN_ROW
    attention.config = tapped_config
    attention._flashvlm_last_token_tap = tap
    try:
        yield tap
    finally:
        attention.config = shared_config
        del attention._flashvlm_last_token_tap
