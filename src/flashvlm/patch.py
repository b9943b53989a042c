"""Attach a selection method to a stock Hugging Face model, and take it off again.

Two seams, both removable: a forward pre-hook (a plain ``model(**inputs)`` call with
images is pruned before the language model runs) and an instance-level ``generate``
wrapper (``generate`` must see the shortened prompt, so that its attention mask, cache
positions and KV cache all hold ``text + K`` positions). The class itself is never
modified, and :meth:`Pruner.remove` restores the instance exactly.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .adapters import PrunedInputs, adapter_for
from .errors import FlashVLMError
from .selection import Budget, TokenSelector, get_method, validate_budget
from .timing import synchronize

_ATTRIBUTE = "_flashvlm_pruner"


class Pruner:
    """A method and budget attached to one model. Create with :func:`apply` or :func:`prune`."""

    def __init__(
        self,
        model: nn.Module,
        budget: Budget,
        method: str | TokenSelector = "flashvlm",
        *,
        video_budget: str = "per_frame",
        timed: bool = False,
        **params,
    ) -> None:
        self.model = model
        self.adapter = adapter_for(model, video_budget=video_budget)
        self.budget = validate_budget(budget)
        self.selector = get_method(method, **params)
        #: The most recent pruning: kept indices per image, lengths before and after.
        self.last: PrunedInputs | None = None
        #: Whether to time each pruning: two device synchronisations per call, so off by
        #: default (the CLI, eval and bench turn it on).
        self.timed = timed
        #: Seconds the most recent vision encoding + selection took (device-synchronised);
        #: None unless ``timed``.
        self.last_selection_seconds: float | None = None
        self._forward_parameters = list(inspect.signature(model.forward).parameters)
        self._hook = None
        self._had_own_generate = False
        self._own_generate = None

    # -- attaching ---------------------------------------------------------------------
    def attach(self) -> Pruner:
        if getattr(self.model, _ATTRIBUTE, None) is not None:
            raise FlashVLMError("this model already has a flashvlm method attached; call flashvlm.remove(model) first")
        self._had_own_generate = "generate" in vars(self.model)
        self._own_generate = vars(self.model).get("generate")
        original_generate = self.model.generate
        self._hook = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

        def generate(*args, **kwargs):
            return self._generate(original_generate, *args, **kwargs)

        self.model.generate = generate
        setattr(self.model, _ATTRIBUTE, self)
        return self

    def remove(self) -> None:
        if getattr(self.model, _ATTRIBUTE, None) is not self:
            return
        self._hook.remove()
        if self._had_own_generate:
            self.model.generate = self._own_generate
        else:
            del self.model.generate
        delattr(self.model, _ATTRIBUTE)

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    # -- the work --------------------------------------------------------------------------
    def prune_inputs(self, model_kwargs: dict[str, Any]) -> PrunedInputs:
        """Arguments for the model with only the kept visual tokens (no hooks involved)."""
        if self.timed:
            device = next(self.model.parameters()).device
            synchronize(device)
            start = time.perf_counter()
        pruned = self.adapter.prune_inputs(model_kwargs, self.selector, self.budget)
        if self.timed:
            synchronize(device)
            self.last_selection_seconds = time.perf_counter() - start
        self.last = pruned
        return pruned

    def _before_forward(self, _module, args: tuple, kwargs: dict[str, Any]):
        if args:
            kwargs = {**dict(zip(self._forward_parameters, args)), **kwargs}
        cache = kwargs.get("past_key_values")
        continuing = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        if continuing or not self.adapter.has_visual_input(kwargs):
            return None
        return (), self.prune_inputs(kwargs).model_kwargs

    def _generate(self, original_generate, *args, **kwargs):
        if args:
            kwargs["input_ids"] = args[0]
            args = args[1:]
        if "inputs" in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        if not self.adapter.has_visual_input(kwargs):
            return original_generate(*args, **kwargs)
        input_ids = kwargs["input_ids"]
        pruned = self.prune_inputs(kwargs)
        output = original_generate(*args, **pruned.model_kwargs)
        # Give back the caller's own prompt followed by the new tokens, so code that slices
        # off `input_ids.shape[1]` prompt tokens works exactly as without flashvlm.
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        repeats = sequences.shape[0] // input_ids.shape[0]
        prompt = input_ids.repeat_interleave(repeats, dim=0).to(sequences.device)
        restored = torch.cat([prompt, sequences[:, pruned.pruned_length :]], dim=1)
        if isinstance(output, torch.Tensor):
            return restored
        output.sequences = restored
        return output


def apply(
    model: nn.Module,
    budget: Budget,
    method: str | TokenSelector = "flashvlm",
    *,
    video_budget: str = "per_frame",
    timed: bool = False,
    **params,
) -> Pruner:
    """Attach a method to ``model`` until :func:`remove` is called. Returns the :class:`Pruner`.

    ``budget`` counts tokens per image; for videos, ``video_budget`` says whether it counts
    per frame (``"per_frame"``, the default) or per video, with the frames selected jointly
    (``"per_video"``). ``timed=True`` records ``pruner.last_selection_seconds`` (at the
    cost of a device synchronisation before and after each pruning). ``params`` are the
    method's parameters.
    """
    return Pruner(model, budget, method, video_budget=video_budget, timed=timed, **params).attach()


def remove(model: nn.Module) -> None:
    """Detach whatever method :func:`apply` attached to ``model`` (no-op if none)."""
    pruner = getattr(model, _ATTRIBUTE, None)
    if pruner is not None:
        pruner.remove()


@contextmanager
def prune(
    model: nn.Module,
    budget: Budget,
    method: str | TokenSelector = "flashvlm",
    *,
    video_budget: str = "per_frame",
    timed: bool = False,
    **params,
):
    """``with flashvlm.prune(model, budget=64): model.generate(...)``; restored on exit (see :func:`apply`)."""
    pruner = apply(model, budget, method, video_budget=video_budget, timed=timed, **params)
    try:
        yield pruner
    finally:
        pruner.remove()
