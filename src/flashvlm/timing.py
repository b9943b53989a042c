"""Wall-clock timing of the language model's prefill, device-synchronised."""

from __future__ import annotations

import time

import torch
from torch import nn


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
        device = next(self.language_model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

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
