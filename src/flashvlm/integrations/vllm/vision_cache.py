"""One vision pass per image: each image's unpruned tower output, kept on the worker by content.

The cache-key rule (``processing.py``) puts the prompt's text into every image's multimodal
hash, so vLLM's encoder cache, which holds the *selected* tokens, serves an image again only
for the same prompt. Everything the selection reads before the text comes in depends on the
image alone: the tower's features, saliency, keys and projected tokens, and the image's
regions (a :class:`~flashvlm.pipeline.VisualItem` before selection). :class:`VisionCache`
keeps that, so a second question about an image runs the selection again but not the tower.

- **Key**: a blake3 digest of the tower's input tensors' bytes (an image's pixels, or
  LLaVA-NeXT's views of it), with their dtype and shape, what else the family's tower reads
  (LLaVA-NeXT's image size, Qwen2.5-VL's patch grid), and which of the outputs that only some
  methods read its request's method reads (:data:`ENCODING_NEEDS`; with settings per request,
  methods that read other outputs get entries of their own). The weights count as fixed: the
  model's ``load_weights`` empties the cache (:func:`clear_vision_cache`), and an engine
  with LoRA adapters, which can change the tower per request, runs with it off.
- **Bound**: a byte budget (``vision_cache_mb``), least recently used first out. An entry's
  size is the bytes of its own tensors (views into a batch's tensors are copied out first).
- **Tensor parallelism**: every rank gets the same pixels and computes the same key, and
  after the collectives holds entries of the same sizes, so every rank hits, misses and
  evicts together: a rank never runs the tower (and its collectives) alone.

Nothing here imports vLLM.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from ...pipeline import ImageSelection, TokenRegion, VisualItem

#: Method needs that change what the tower pass computes: an entry computed without them
#: lacks keys or projected tokens, or the release's saliency. The key carries the ones an
#: image's method has, so an entry always holds what the methods that find it read.
ENCODING_NEEDS = frozenset({"keys", "projected", "release_saliency"})

MIB = 1 << 20


@dataclass
class EncodedImage:
    """One image's unpruned tower output, as the selection reads it: the item before selection
    (per-token tensors, newlines, budget units and regions) and how its saliency was taken.

    ``item.saliency`` is the family's own saliency (None when only the release's was taken)
    and ``release_saliency`` the release's CLS attention, for the methods that read it
    (``release_saliency`` in their needs; None where the pass did not compute it):
    :meth:`for_selection` hands each request the one its method reads.
    """

    item: VisualItem
    saliency_kind: str  # "cls" or "received"
    key_heads: int | None
    release_saliency: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        item = self.item
        found = [getattr(item, name) for name in ("features", "tokens", "saliency", "keys", "lm_attention")]
        found += [*item.side_outputs.values(), item.is_newline, item.row_of, self.release_saliency]
        found += [region.positions for unit in item.units for region in unit.regions]
        return [tensor for tensor in found if tensor is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors (each storage once)."""
        storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in self.tensors()}
        return sum(storages.values())

    def with_tensors(self, function: Callable[[torch.Tensor], torch.Tensor]) -> EncodedImage:
        """A copy with ``function`` applied to every tensor, and budget units that record no
        selection yet (the tensors themselves are shared when ``function`` returns them)."""
        item = self.item.map(function)
        units = [
            ImageSelection.of(
                unit.kind, [TokenRegion(function(region.positions), region.grid_shape) for region in unit.regions]
            )
            for unit in item.units
        ]
        item = replace(
            item,
            is_newline=None if item.is_newline is None else function(item.is_newline),
            row_of=None if item.row_of is None else function(item.row_of),
            units=units,
            keep=None,
            sent=None,
            sent_side_outputs={},
        )
        release = None if self.release_saliency is None else function(self.release_saliency)
        return replace(self, item=item, release_saliency=release)

    def for_selection(self, requires: frozenset[str]) -> EncodedImage:
        """A copy whose item one request's selection may fill, with the saliency its method
        (of needs ``requires``) reads; the tensors are shared, and read only."""
        copy = self.with_tensors(lambda tensor: tensor)
        if "release_saliency" in requires and self.release_saliency is not None:
            copy.item.saliency = self.release_saliency
        return copy

    def owning(self) -> EncodedImage:
        """A copy whose tensors own their memory: a view into a batch's tensor (one image of
        several) is copied out, so that the entry holds no more than its own bytes."""

        def own(tensor: torch.Tensor) -> torch.Tensor:
            exact = (
                tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
            )
            return tensor if exact else tensor.clone(memory_format=torch.contiguous_format)

        return self.with_tensors(own)


def rows(values: torch.Tensor, chosen: list[int]) -> torch.Tensor:
    """``values[chosen]`` (ascending row indices), without a copy when ``chosen`` is every row."""
    return values if len(chosen) == len(values) else values[chosen]


def content_keys(
    tensors: Sequence[torch.Tensor], extras: Sequence[Hashable], requires: Sequence[frozenset[str]]
) -> list[tuple]:
    """One key per image: a digest of its tower input's bytes, their dtype and shape, the
    image's ``extras`` (what else its tower output depends on), and which of the outputs only
    some methods read its method needs (``requires``: its method's needs). One copy to the host
    for all images."""
    flat = [tensor.detach().contiguous().reshape(-1).view(torch.uint8) for tensor in tensors]
    host = (flat[0] if len(flat) == 1 else torch.cat(flat)).cpu().numpy() if flat else None
    keys, start = [], 0
    for tensor, extra, needs, raw in zip(tensors, extras, requires, flat):
        digest = _digest(host[start : start + raw.numel()])
        start += raw.numel()
        keys.append((tuple(sorted(needs & ENCODING_NEEDS)), str(tensor.dtype), tuple(tensor.shape), extra, digest))
    return keys


def _digest(data) -> bytes:
    try:
        from blake3 import blake3  # vLLM's own multimodal hasher (a vLLM dependency)
    except ImportError:  # pragma: no cover - vLLM installs it
        return hashlib.sha256(data).digest()
    return blake3(data).digest()


@dataclass
class VisionStats:
    """What the cache did since the model was built (``LLM.apply_model(flashvlm_vision_stats)``)."""

    capacity: int  # bytes; 0: the cache is off
    tower_runs: int = 0  # tower passes (each over one or several images)
    images: int = 0  # images the selection was asked for
    images_encoded: int = 0  # of them, images the tower ran on
    evictions: int = 0
    entries: int = 0
    bytes: int = 0  # held now


class VisionCache:
    """Images' tower outputs by content key, least recently used first out, within ``capacity`` bytes.

    :meth:`encode` is the whole use: keys in, one tower pass over the images it lacks, every
    image's output out. With ``capacity`` 0 it runs the tower over every image, as without it.
    """

    def __init__(self, capacity: int) -> None:
        self.entries: OrderedDict[Hashable, tuple[EncodedImage, int]] = OrderedDict()
        self.stats = VisionStats(capacity=max(0, int(capacity)))
        #: Memory held through vLLM's profiling run (:meth:`hold_reserve`).
        self.reserve: torch.Tensor | None = None
        self.calls = 0

    @property
    def enabled(self) -> bool:
        return self.stats.capacity > 0

    def encode(
        self,
        tensors: Sequence[torch.Tensor],
        extras: Sequence[Hashable],
        requires: Sequence[frozenset[str]],
        run_tower: Callable[[list[int]], list[EncodedImage]],
    ) -> list[EncodedImage]:
        """Each image's tower output, for one selection each.

        ``tensors[i]`` is image ``i``'s tower input, ``extras[i]`` whatever else its output
        depends on, and ``requires[i]`` its method's needs; ``run_tower(indices)`` runs the
        tower once over those images, for their methods, and returns their outputs in that
        order. Images already here are not encoded again, and an image that comes twice in one
        call (for methods of the same needs) is encoded once.
        """
        num_images = len(tensors)
        self.stats.images += num_images
        storing = self.hold_reserve(tensors[0].device if num_images else None)
        if not self.enabled:
            encoded = self.run(run_tower, list(range(num_images)))
            return [image.for_selection(needs) for image, needs in zip(encoded, requires)]
        keys = content_keys(tensors, extras, requires)
        found: dict[Hashable, EncodedImage] = {}
        missing: dict[Hashable, int] = {}  # key -> the first image that has it
        for index, key in enumerate(keys):
            if key in found or key in missing:
                continue
            if key in self.entries:
                self.entries.move_to_end(key)
                found[key] = self.entries[key][0]
            else:
                missing[key] = index
        if missing:
            for key, encoded in zip(missing, self.run(run_tower, list(missing.values()))):
                if storing:
                    encoded = encoded.owning()
                    self.store(key, encoded)
                found[key] = encoded
        return [found[key].for_selection(needs) for key, needs in zip(keys, requires)]

    def run(self, run_tower: Callable[[list[int]], list[EncodedImage]], indices: list[int]) -> list[EncodedImage]:
        encoded = run_tower(indices)
        if len(encoded) != len(indices):
            raise RuntimeError(f"the tower gave {len(encoded)} outputs for {len(indices)} images")
        self.stats.tower_runs += 1
        self.stats.images_encoded += len(indices)
        return encoded

    def store(self, key: Hashable, encoded: EncodedImage) -> None:
        """Keep ``encoded`` (its tensors its own), evicting the least recently used until it
        fits; an entry larger than the whole budget is not kept."""
        size = encoded.nbytes
        if size > self.stats.capacity:
            return
        while self.stats.bytes + size > self.stats.capacity:
            _, (_, evicted) = self.entries.popitem(last=False)
            self.stats.bytes -= evicted
            self.stats.evictions += 1
        self.entries[key] = (encoded, size)
        self.stats.bytes += size
        self.stats.entries = len(self.entries)

    def hold_reserve(self, device: torch.device | None) -> bool:
        """Account for the cache in vLLM's KV-cache sizing on an accelerator; True when this
        call's outputs may be stored.

        A GPU worker sizes its KV cache from the memory its profiling run peaks at, and that
        run is the model's first encoder call (on dummy images). Memory the cache fills later
        would be outside that count, so the first call on an accelerator holds the whole
        budget, stores nothing, and lets the budget go at the next call, when the cache starts
        filling it. On the CPU (whose KV cache has a fixed size) nothing is held.
        """
        self.calls += 1
        if self.calls == 2:
            self.reserve = None
        if self.calls > 1 or not self.enabled or device is None or device.type == "cpu":
            return True
        self.reserve = torch.empty(self.stats.capacity, dtype=torch.uint8, device=device)
        return False


def clear_vision_cache(model) -> bool:
    """Empty a pruned model's vision cache (for ``LLM.apply_model`` after changing the weights
    by other means than the model's ``load_weights``, which empties it itself)."""
    cache = getattr(model, "flashvlm_vision", None)
    if cache is None:
        return False
    cache.entries.clear()
    cache.stats.bytes = cache.stats.entries = 0
    return True


def flashvlm_vision_stats(model) -> dict | None:
    """A pruned model's :class:`VisionStats` as a dict (for ``LLM.apply_model``); None for a stock model."""
    cache = getattr(model, "flashvlm_vision", None)
    return None if cache is None else asdict(cache.stats)


# -- counting tower passes (tests and the throughput bench read them with LLM.apply_model) --


def count_tower_passes(model) -> bool:
    """Log every pass of a served family's vision tower on ``model`` (pruned or stock): a
    forward pre-hook on the tower module records how many inputs each pass took (LLaVA: images
    or AnyRes views; InternVL: tiles and frames; Qwen2.5-VL: images). Read with :func:`take_tower_passes`; idempotent."""
    tower = getattr(model, "vision_tower", None) or getattr(model, "visual", None)
    tower = tower or getattr(getattr(model, "model", None), "vision_model", None)  # Idefics3, SmolVLM
    if tower is None:
        return False
    if not hasattr(model, "flashvlm_tower_passes"):

        def log(_module, args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)  # Qwen: one (t, h, w) per image
            pixels = args[0] if args else kwargs["pixel_values"]  # LLaVA, InternVL: (V, 3, H, W)
            model.flashvlm_tower_passes.append(
                len(grid) if grid is not None else len(pixels) if pixels.dim() == 4 else 1
            )

        model.flashvlm_tower_passes = []
        tower.register_forward_pre_hook(log, with_kwargs=True)
    return True


def take_tower_passes(model) -> list[int]:
    """The tower passes logged since the last take (inputs per pass), oldest first."""
    passes = list(getattr(model, "flashvlm_tower_passes", ()))
    if passes:
        model.flashvlm_tower_passes.clear()
    return passes
