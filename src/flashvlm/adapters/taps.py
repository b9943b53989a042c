"""Taps into the vision tower and the language model: capture one layer, stop the forward there.

A tap is a context manager around a stock module: hooks (or a per-module attention
implementation) are installed on entry and removed on exit, so the model is never
permanently altered. A module's hooks fire for every thread that calls it, so each tap
acts only on the forwards of the thread that installed it (:func:`this_thread_only`):
threads sharing one model each see their own tensors.
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import FlashVLMError


def this_thread_only(hook):
    """``hook``, acting only on the forwards of the thread that calls this (others pass untouched).

    For forward hooks and forward pre-hooks: returning None leaves a call as it was.
    """
    owner = threading.get_ident()

    def guarded(*args, **kwargs):
        if threading.get_ident() == owner:
            return hook(*args, **kwargs)
        return None

    return guarded


@contextmanager
def capture(
    outputs: Mapping[str, nn.Module] | None = None, keyword_inputs_of: nn.Module | None = None
) -> Iterator[dict[str, Any]]:
    """During the block, one dict holding the output of each module of ``outputs`` under its
    name, and the keyword arguments ``keyword_inputs_of`` is called with (this thread's forwards only)."""
    captured: dict[str, Any] = {}
    handles = [
        module.register_forward_hook(this_thread_only(lambda _m, _a, out, name=name: captured.update({name: out})))
        for name, module in (outputs or {}).items()
    ]
    if keyword_inputs_of is not None:
        keep_kwargs = this_thread_only(lambda _m, _args, kwargs: captured.update(kwargs))
        handles.append(keyword_inputs_of.register_forward_pre_hook(keep_kwargs, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


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

    handles.append(layer.register_forward_hook(this_thread_only(keep_output)))
    if capture_qk:
        attention = layer.self_attn
        keep_queries = this_thread_only(lambda _m, _a, out: setattr(tap, "queries", out))
        keep_keys = this_thread_only(lambda _m, _a, out: setattr(tap, "keys", out))
        handles.append(attention.q_proj.register_forward_hook(keep_queries))
        handles.append(attention.k_proj.register_forward_hook(keep_keys))
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
    #: The module's own attention function: what other threads' calls run meanwhile.
    stock: Callable
    attention: torch.Tensor | None = None  # (B, L) float32, the last real token's attention, mean over heads
    thread: int = field(default_factory=threading.get_ident)  # the thread whose forward is tapped


#: One tapped layer at a time: the tap lives on the (shared) attention module.
_LAST_TOKEN_LOCK = threading.Lock()


def _last_token_row(module: nn.Module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention "implementation" for one tapped layer: compute one row, then end the forward.

    query: (B, H, L, d) and key: (B, H_kv, L, d), already rotated. The causal mask allows
    the last real token every key, so only padding is masked (from the 2-D mask).
    """
    tap: LastTokenTap = module._flashvlm_last_token_tap
    if threading.get_ident() != tap.thread:
        return tap.stock(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
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
    windows and logit soft-capping are not modelled). Other threads' calls through the
    module meanwhile run its own attention, and their taps wait for this one to end.
    """
    with _LAST_TOKEN_LOCK:
        shared_config = attention.config
        eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
        stock = ALL_ATTENTION_FUNCTIONS.get_interface(shared_config._attn_implementation, eager)
        tap = LastTokenTap(key_mask=attention_mask.bool(), stock=stock)
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
