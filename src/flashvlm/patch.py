"""Attach a selection method to a stock Hugging Face model, and take it off again.

Two seams, both removable: a forward pre-hook (a plain ``model(**inputs)`` call with
images is pruned before the language model runs) and an instance-level ``generate``
wrapper (``generate`` must see the shortened prompt, so that its attention mask, cache
positions and KV cache all hold ``text + K`` positions). The class itself is never
modified, and :meth:`Pruner.remove` restores the instance exactly. A forward hook marks
the KV cache a pruned forward filled, as the wrapper marks a pruned generate's (see
:func:`mark_pruned_prompt`). A ``torch.compile`` wrapper is unwrapped: the method attaches
to the module it compiles, so calls through the wrapper are pruned too. Threads may share
one pruner: each sees its own ``last``.
"""

from __future__ import annotations

import inspect
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import NEWLINES, TILE_BUDGETS, VIDEO_BUDGETS, PrunedInputs, adapter_for
from .errors import FlashVLMError
from .selection import Budget, TokenSelector, get_method, validate_budget
from .selection.base import check_choice
from .timing import synchronize

_ATTRIBUTE = "_flashvlm_pruner"
#: The forward/generate argument that carries the user's question (see ``text_tokens``).
QUESTION_ARGUMENT = "question"

#: The attribute that marks a KV cache a pruned prompt filled (see :func:`mark_pruned_prompt`).
_PRUNED_PROMPT = "_flashvlm_pruned_prompt"
_CONTINUING_REFUSED = (
    "this KV cache holds a pruned prompt (its text and only the kept visual tokens), so continuing "
    "from it with the caller's unpruned ids would misalign every position; run generate "
    "again on the whole conversation (prompt, answer and follow-up) with its images instead"
)


def holds_pruned_prompt(cache) -> bool:
    """Whether a pruned prompt filled ``cache`` (it then holds ``text + K`` positions, not ``text + N``)."""
    return bool(getattr(cache, _PRUNED_PROMPT, False))


def _refuse_to_grow(*_args, **_kwargs):
    raise FlashVLMError(_CONTINUING_REFUSED)


def mark_pruned_prompt(cache) -> None:
    """Make a KV cache that a pruned prompt filled refuse to grow, attached or not.

    Its positions are ``text + K`` where the caller's ids count ``text + N``, so any later
    ``generate`` or forward that continues from it would misalign every position. The mark
    lives on the cache object, not the model: its ``update`` (what every attention layer
    calls to append keys and values) is shadowed by one that raises, so the refusal holds
    after the pruner is removed and costs nothing to a cache flashvlm never filled. Reading
    the cache (its length, its tensors) still works.
    """
    if cache is None or holds_pruned_prompt(cache):
        return
    setattr(cache, _PRUNED_PROMPT, True)
    cache.update = _refuse_to_grow


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile(model)`` wrapper compiles, or ``model`` itself.

    The wrapper's forward runs the original module's ``__call__`` (its hooks included), and
    its attributes, ``generate`` among them, are the original's: attaching there prunes both.
    """
    # Only a loaded torch._dynamo can have made a wrapper (importing it here would cost seconds).
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return model._orig_mod
    return model


class _CallState(threading.local):
    """A pruner's record of the calls one thread makes (each thread starts from these defaults)."""

    last: PrunedInputs | None = None
    selection_seconds: float | None = None
    # True while the generate wrapper runs: its forwards belong to the call it recorded.
    generating: bool = False
    # Whether the forward in progress was pruned (its KV cache is then marked).
    pruned_forward: bool = False


@dataclass(frozen=True)
class PruneOptions:
    """What a pruner is told, validated once when made: budget, method and its parameters, and the settings.

    ``budget`` counts tokens per image; for videos, ``video_budget`` says whether it counts
    per frame (``"per_frame"``, the default) or per video, with the frames selected jointly
    (``"per_video"``). ``newlines`` says which LLaVA-NeXT/OneVision row newlines (outside
    the budget) stay: those of rows that keep a token (``"kept_rows"``, the default) or
    every row's (``"every_row"``: an image's token count then follows from its size, as in
    the vLLM plug-in). ``tile_budget`` says how an image of tiles (InternVL, Idefics3/SmolVLM)
    shares its budget: its tiles jointly, the global view its share (``"per_image"``, the
    default), or each tile and the global view its own share (``"per_tile"``, as the vLLM
    plug-in serves Idefics3/SmolVLM). ``tokenizer`` (the model's tokenizer or processor) lets a method with
    ``text_tokens="question"`` (e.g. ``"flashvlm:question"``) find the ``question=`` passed to
    ``generate``/``forward`` in the prompt. ``timed=True`` records
    ``pruner.last_selection_seconds``, at the cost of a device synchronisation before and
    after each pruning (the CLI, eval and bench turn it on). ``params`` are the method's.
    """

    budget: Budget
    method: str | TokenSelector = "flashvlm"
    params: Mapping[str, Any] = field(default_factory=dict)
    video_budget: str = "per_frame"
    newlines: str = "kept_rows"
    tile_budget: str = "per_image"
    tokenizer: Any = None
    timed: bool = False
    #: The method instance, made from ``method`` and ``params``.
    selector: TokenSelector = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", validate_budget(self.budget))
        check_choice("video_budget", self.video_budget, VIDEO_BUDGETS)
        check_choice("newlines", self.newlines, NEWLINES)
        check_choice("tile_budget", self.tile_budget, TILE_BUDGETS)
        object.__setattr__(self, "selector", get_method(self.method, **self.params))

    @classmethod
    def of(
        cls,
        budget: Budget,
        method: str | TokenSelector = "flashvlm",
        *,
        video_budget: str = "per_frame",
        newlines: str = "kept_rows",
        tile_budget: str = "per_image",
        tokenizer=None,
        timed: bool = False,
        **params,
    ) -> PruneOptions:
        """The options as :func:`apply` and :func:`prune` take them: the method's parameters as keywords."""
        return cls(budget, method, params, video_budget, newlines, tile_budget, tokenizer, timed)


class Pruner:
    """A method and budget attached to one model. Create with :func:`apply` or :func:`prune`.

    ``Pruner(model, options)`` takes a :class:`PruneOptions`; ``Pruner(model, budget, method,
    **settings)`` makes them as :meth:`PruneOptions.of` does.
    """

    def __init__(
        self, model: nn.Module, options: PruneOptions | Budget, method: str | TokenSelector = "flashvlm", **settings
    ) -> None:
        if not isinstance(options, PruneOptions):
            options = PruneOptions.of(options, method, **settings)
        model = unwrap_compiled(model)
        self.model = model
        self.options = options
        self.adapter = adapter_for(
            model,
            video_budget=options.video_budget,
            tokenizer=options.tokenizer,
            newlines=options.newlines,
            tile_budget=options.tile_budget,
        )
        self.budget = options.budget
        self.selector = options.selector
        self.timed = options.timed
        self._forward_parameters = list(inspect.signature(model.forward).parameters)
        self._hooks = []
        self._had_own_generate = False
        self._own_generate = None
        # What one call leaves behind, per thread: threads sharing this pruner each see their own.
        self._calls = _CallState()

    @property
    def last(self) -> PrunedInputs | None:
        """This thread's most recent call's pruning: kept indices per image, lengths before and
        after; None before any call (in this thread) and after a call without visual input."""
        return self._calls.last

    @last.setter
    def last(self, pruned: PrunedInputs | None) -> None:
        self._calls.last = pruned

    @property
    def last_selection_seconds(self) -> float | None:
        """Seconds this thread's most recent vision encoding + selection took
        (device-synchronised); None unless ``timed``."""
        return self._calls.selection_seconds

    @last_selection_seconds.setter
    def last_selection_seconds(self, seconds: float | None) -> None:
        self._calls.selection_seconds = seconds

    # -- attaching ---------------------------------------------------------------------
    def attach(self) -> Pruner:
        if getattr(self.model, _ATTRIBUTE, None) is not None:
            raise FlashVLMError("this model already has a flashvlm method attached; call flashvlm.remove(model) first")
        self._had_own_generate = "generate" in vars(self.model)
        self._own_generate = vars(self.model).get("generate")
        original_generate = self.model.generate
        self._hooks = [
            self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            self.model.register_forward_hook(self._after_forward),
        ]

        def generate(*args, **kwargs):
            return self._generate(original_generate, *args, **kwargs)

        self.model.generate = generate
        setattr(self.model, _ATTRIBUTE, self)
        return self

    def remove(self) -> None:
        if getattr(self.model, _ATTRIBUTE, None) is not self:
            return
        for hook in self._hooks:
            hook.remove()
        if self._had_own_generate:
            self.model.generate = self._own_generate
        else:
            del self.model.generate
        delattr(self.model, _ATTRIBUTE)

    def __enter__(self) -> Pruner:
        # ``with Pruner(model, 64):`` attaches as ``with flashvlm.prune(model, 64):`` does; it ran unpruned.
        if getattr(self.model, _ATTRIBUTE, None) is not self:
            self.attach()
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    # -- the work --------------------------------------------------------------------------
    def prune_inputs(self, model_kwargs: dict[str, Any]) -> PrunedInputs:
        """Arguments for the model with only the kept visual tokens (no hooks involved).

        A ``question`` entry (the user's words, a string or one per batch row) guides a
        method whose ``text_tokens`` is "question"; it never reaches the model.
        """
        model_kwargs = dict(model_kwargs)
        questions = model_kwargs.pop(QUESTION_ARGUMENT, None)
        with self._selection_clock():
            pruned = self.adapter.prune_inputs(model_kwargs, self.selector, self.budget, questions)
        self.last = pruned
        return pruned

    @contextmanager
    def _selection_clock(self) -> Iterator[None]:
        """When ``timed``, records the block's device-synchronised seconds as this thread's
        ``last_selection_seconds``; otherwise adds no synchronisation."""
        if not self.timed:
            yield
            return
        device = next(self.model.parameters()).device
        synchronize(device)
        start = time.perf_counter()
        yield
        synchronize(device)
        self.last_selection_seconds = time.perf_counter() - start

    def _forget_last(self) -> None:
        self.last = None
        self.last_selection_seconds = None

    def _before_forward(self, _module, args: tuple, kwargs: dict[str, Any]):
        if args:
            kwargs = {**dict(zip(self._forward_parameters, args)), **kwargs}
        continuing = filled_cache(kwargs) is not None
        self._calls.pruned_forward = False
        if continuing or not self.adapter.has_visual_input(kwargs):
            # A call without images forgets the last selection, except the decoding steps of
            # the pruned generate in progress, which continue from its cache.
            if not continuing and not self._calls.generating:
                self._forget_last()
            if QUESTION_ARGUMENT not in kwargs:
                return None
            return (), {name: value for name, value in kwargs.items() if name != QUESTION_ARGUMENT}
        pruned_kwargs = self.prune_inputs(kwargs).model_kwargs
        self._calls.pruned_forward = True
        return (), pruned_kwargs

    def _after_forward(self, _module, _args: tuple, output):
        # A plain forward the pre-hook pruned leaves a text + K cache, like a pruned generate.
        if self._calls.pruned_forward:
            self._calls.pruned_forward = False
            for name in _CACHE_NAMES:
                mark_pruned_prompt(getattr(output, name, None))

    def _generate(self, original_generate, *args, **kwargs):
        if args:
            kwargs["input_ids"] = args[0]
            args = args[1:]
        if "inputs" in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        cache = filled_cache(kwargs)
        if cache is not None and holds_pruned_prompt(cache):
            raise FlashVLMError(_CONTINUING_REFUSED)
        if cache is not None or not self.adapter.has_visual_input(kwargs):
            # A cache filled without pruning already holds every visual token: nothing to prune.
            self._forget_last()
            kwargs.pop(QUESTION_ARGUMENT, None)
            return original_generate(*args, **kwargs)
        input_ids = kwargs["input_ids"]
        pruned = self.prune_inputs(kwargs)
        self._calls.generating = True
        try:
            output = original_generate(*args, **pruned.model_kwargs)
        finally:
            self._calls.generating = False
        for name in _CACHE_NAMES:
            mark_pruned_prompt(pruned.model_kwargs.get(name))
            mark_pruned_prompt(getattr(output, name, None))
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


def apply(model: nn.Module, budget: Budget, method: str | TokenSelector = "flashvlm", **settings) -> Pruner:
    """Attach a method to ``model`` until :func:`remove` is called. Returns the :class:`Pruner`.

    ``settings`` are :meth:`PruneOptions.of`'s keywords (``video_budget``, ``newlines``,
    ``tokenizer``, ``timed``) and the method's parameters; :class:`PruneOptions` says what each means.
    """
    return Pruner(model, PruneOptions.of(budget, method, **settings)).attach()


#: Names a KV cache is passed under: transformers 5 renamed ``past_key_values`` to ``cache``.
_CACHE_NAMES = ("cache", "past_key_values")


def filled_cache(model_kwargs: dict[str, Any]):
    """The KV cache argument when it already holds positions, else None."""
    for name in _CACHE_NAMES:
        cache = model_kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return cache
    return None


def remove(model: nn.Module) -> None:
    """Detach whatever method :func:`apply` attached to ``model`` (no-op if none)."""
    pruner = getattr(unwrap_compiled(model), _ATTRIBUTE, None)
    if pruner is not None:
        pruner.remove()


@contextmanager
def prune(model: nn.Module, budget: Budget, method: str | TokenSelector = "flashvlm", **settings):
    """``with flashvlm.prune(model, budget=64): model.generate(...)``; restored on exit (see :func:`apply`)."""
    pruner = apply(model, budget, method, **settings)
    try:
        yield pruner
    finally:
        pruner.remove()
