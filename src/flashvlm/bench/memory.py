"""Peak memory of a piece of work: the CUDA allocator's high-water mark, or, on CPU,
the largest total of live tensor storages that torch operations created.

The CPU tracker runs every operation through a dispatch mode, which slows it down:
measure memory and time in separate runs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..timing import synchronize


class _LiveStorageTracker(TorchDispatchMode):
    """Sums the bytes of storages created by operations while they are alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._references: dict[int, int] = {}  # storage address -> tensors still holding it
        self._sizes: dict[int, int] = {}

    def _release(self, address: int) -> None:
        self._references[address] -= 1
        if self._references[address] == 0:
            del self._references[address]
            self.live_bytes -= self._sizes.pop(address)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
            if address == 0:
                continue
            if address not in self._references:
                self._references[address] = 0
                self._sizes[address] = storage.nbytes()
                self.live_bytes += storage.nbytes()
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self._references[address] += 1
            weakref.finalize(tensor, self._release, address)
        return output


def peak_memory_bytes(work: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of ``work()`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: live storages created by torch
    operations during ``work`` (tensors it receives are not counted; its result is,
    while it lives).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = work()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    tracker = _LiveStorageTracker()
    with tracker:
        result = work()
    del result
    return tracker.peak_bytes
