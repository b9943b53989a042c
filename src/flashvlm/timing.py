"""Wall-clock timing, device-synchronised: the one sync helper, and the prefill timer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has finished its queued work (CUDA; elsewhere work is already
    done when a call returns), so that a clock read next counts that work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class CallStamps:
    """``time.perf_counter()`` readings around the latest call (None before any)."""

    started_at: float | None = None
    ended_at: float | None = None


@contextmanager
def stamped_calls(owner: object, method_name: str, device: torch.device | str) -> Iterator[CallStamps]:
    """Within the block, each call of ``owner.<method_name>`` is device-synchronised and
    stamped on entry and exit. The stamping method is set on this instance only and
    removed on exit, so everyone holding ``owner`` keeps the same object, untouched after.
    """
    stamps = CallStamps()
    original = getattr(owner, method_name)

    def stamped(*args, **kwargs):
        synchronize(device)
        stamps.started_at = time.perf_counter()
        result = original(*args, **kwargs)
        synchronize(device)
        stamps.ended_at = time.perf_counter()
        return result

    setattr(owner, method_name, stamped)
    try:
        yield stamps
    finally:
        delattr(owner, method_name)


class PrefillTimer:
    """Times the first forward of ``language_model`` inside the ``with`` block: the prefill.

    Later forwards (decoding steps) are counted in ``decode_steps`` but not timed.
    ``prefill_started_at`` / ``prefill_ended_at`` are the ``time.perf_counter()``
    readings around the prefill, for placing it on a timeline.
    """

    def __init__(self, language_model: nn.Module) -> None:
        self.language_model = language_model
        self.prefill_seconds: float | None = None
        self.prefill_length: int | None = None
        self.decode_steps = 0
        self.prefill_started_at: float | None = None
        self.prefill_ended_at: float | None = None
        self._handles = []

    def _sync(self) -> None:
        synchronize(next(self.language_model.parameters()).device)

    def _before(self, _module, args, kwargs):
        if self.prefill_seconds is None:
            embeds = kwargs.get("inputs_embeds")
            self.prefill_length = int(embeds.shape[1]) if embeds is not None else None
            self._sync()
            self.prefill_started_at = time.perf_counter()

    def _after(self, _module, _args, _kwargs, _output):
        if self.prefill_seconds is None:
            self._sync()
            self.prefill_ended_at = time.perf_counter()
            self.prefill_seconds = self.prefill_ended_at - self.prefill_started_at
        else:
            self.decode_steps += 1

    def __enter__(self) -> PrefillTimer:
        self._handles = [
            self.language_model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.language_model.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
