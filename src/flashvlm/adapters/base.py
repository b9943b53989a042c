"""The model-adapter interface and the sequence surgery every adapter shares.

An adapter knows one model family: how to run its vision tower up to the feature
layer (with saliency taken from that layer's queries and keys), how to project, where
the prompt's text is, and how the language model receives visual tokens. It knows
nothing about any selection method: it gathers what the method ``requires`` and hands
it a :class:`~flashvlm.selection.SelectionInputs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import FlashVLMError
from ..selection import Budget, TokenSelector


@dataclass
class ImageSelection:
    """What happened to one image (or frame group): for reports and visualisation."""

    batch_index: int  # row of the batch the image belongs to
    num_tokens: int  # N: visual tokens the image had
    keep_indices: torch.Tensor  # (K,) kept token positions, ascending
    grid_shape: tuple[int, int] | None = None  # (rows, cols) of the token raster

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

    def __init__(self, model: nn.Module) -> None:
        self.model = model

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

    @abstractmethod
    def prune_inputs(self, model_kwargs: dict[str, Any], selector: TokenSelector, budget: Budget) -> PrunedInputs:
        """Run the vision side, select, and return arguments for the unpruned-token-free forward."""


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
