"""The worker's vision cache on its own (no engine): keys, one tower pass per distinct image,
least-recently-used eviction within the byte budget, fresh selections, the reserve on an
accelerator. The engine tests (test_vllm_llava.py, _llava_next.py, _qwen.py) count tower
passes and compare reuse with a new pass in vLLM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flashvlm.integrations.vllm.pruned_model import PrunedModelMixin
from flashvlm.integrations.vllm.settings import parse_settings
from flashvlm.integrations.vllm.vision_cache import EncodedImage, VisionCache, clear_vision_cache, content_keys, rows
from flashvlm.pipeline import ImageSelection, TokenRegion, VisualItem, keep_tokens, select_regions
from flashvlm.selection import get_method

TOKENS, CHANNELS = 16, 8
#: One entry: features (16 x 8 float32), saliency (16 float32), positions (16 int64).
ENTRY_BYTES = TOKENS * (CHANNELS * 4 + 4 + 8)


def pixels(seed: int) -> torch.Tensor:
    return torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(seed))


class Tower:
    """A stand-in tower: each image's features are a function of its pixels; logs its passes."""

    def __init__(self, images: list[torch.Tensor]) -> None:
        self.images = images
        self.passes: list[list[int]] = []

    def __call__(self, chosen: list[int]) -> list[EncodedImage]:
        self.passes.append(chosen)
        batch = torch.stack([self.images[index] for index in chosen])  # (I, 3, 4, 4)
        features = batch.flatten(1).repeat(1, 3)[:, : TOKENS * CHANNELS].view(len(chosen), TOKENS, CHANNELS)
        positions = torch.arange(TOKENS)
        return [
            EncodedImage(
                VisualItem(
                    "image",
                    features[image],  # a view into the batch's tensor
                    saliency=features[image].sum(-1),
                    units=[ImageSelection.of("image", [TokenRegion(positions, (4, 4))])],
                ),
                "received",
                None,
            )
            for image in range(len(chosen))
        ]


def encode(cache: VisionCache, tower: Tower, images: list[int], needs=frozenset({"saliency"})) -> list[EncodedImage]:
    tensors = [tower.images[index] for index in images]
    requires = [needs] * len(images)
    return cache.encode(tensors, [None] * len(images), requires, lambda chosen: tower([images[i] for i in chosen]))


def test_the_key_covers_bytes_dtype_shape_extras_and_computed_outputs():
    image = pixels(0)
    needs = frozenset({"saliency", "text"})

    def key(tensor, extra=None, requires=needs):
        return content_keys([tensor], [extra], [requires])

    (same,) = key(image)
    assert key(image.clone()) == [same]
    assert key(torch.stack([pixels(1), image])[1]) == [same]  # a view of a batch
    assert key(image, requires=frozenset({"saliency"})) == [same]  # the text is not part of it
    changed = image.clone()
    changed[0, 0, 0] += 1e-7
    others = [
        key(changed),
        key(image.double()),
        key(image.reshape(3, 2, 8)),
        key(image, (4, 4)),  # e.g. another image size or grid
        key(image, requires=needs | {"keys"}),  # a method that reads keys
        key(image, requires=needs | {"release_saliency"}),  # or the release's saliency
    ]
    assert all(other != [same] for other in others)
    assert len({other[0] for other in others}) == len(others)


def test_each_distinct_image_runs_the_tower_once():
    tower = Tower([pixels(0), pixels(1), pixels(0).clone()])
    cache = VisionCache(10 * ENTRY_BYTES)
    first = encode(cache, tower, [0, 1, 2, 0])  # image 2 has image 0's pixels
    assert tower.passes == [[0, 1]]
    assert torch.equal(first[2].item.features, first[0].item.features)
    again = encode(cache, tower, [2, 1])
    assert tower.passes == [[0, 1]]
    assert torch.equal(again[1].item.features, first[1].item.features)
    stats = cache.stats
    assert (stats.tower_runs, stats.images, stats.images_encoded, stats.entries) == (1, 6, 2, 2)
    assert stats.bytes == 2 * ENTRY_BYTES  # each entry its own bytes, not its batch's


def test_off_runs_the_tower_over_every_image_as_before():
    tower = Tower([pixels(0), pixels(0)])
    cache = VisionCache(0)
    encoded = encode(cache, tower, [0, 1])
    encode(cache, tower, [0])
    assert tower.passes == [[0, 1], [0]]
    assert encoded[0].item.features.untyped_storage().nbytes() > TOKENS * CHANNELS * 4  # untouched: a view
    assert (cache.stats.entries, cache.stats.bytes) == (0, 0)


def test_a_full_cache_evicts_the_least_recently_used_image():
    tower = Tower([pixels(seed) for seed in range(4)])
    cache = VisionCache(2 * ENTRY_BYTES + ENTRY_BYTES // 2)  # room for two
    encode(cache, tower, [0])
    encode(cache, tower, [1])
    encode(cache, tower, [0])  # a hit: image 0 is now the most recent
    encode(cache, tower, [2])  # evicts image 1
    assert tower.passes == [[0], [1], [2]]
    encode(cache, tower, [0])
    encode(cache, tower, [1])  # evicts image 2
    encode(cache, tower, [2])  # evicts image 0
    assert tower.passes == [[0], [1], [2], [1], [2]]
    stats = cache.stats
    assert (stats.evictions, stats.entries, stats.bytes) == (3, 2, 2 * ENTRY_BYTES)


def test_an_image_larger_than_the_budget_is_served_but_not_kept():
    tower = Tower([pixels(0)])
    cache = VisionCache(ENTRY_BYTES - 1)
    assert len(encode(cache, tower, [0, 0])) == 2
    encode(cache, tower, [0])
    assert tower.passes == [[0], [0]]
    assert cache.stats.entries == cache.stats.bytes == 0


def test_every_request_selects_on_its_own_copy():
    tower = Tower([pixels(0)])
    cache = VisionCache(10 * ENTRY_BYTES)
    selector = get_method("pool")
    kept = []
    for budget in (4, 9):
        (image,) = encode(cache, tower, [0], selector.requires)
        select_regions([image.item], selector, budget, None, image.saliency_kind, image.key_heads)
        keep_tokens(image.item, lambda features: features, newlines="every_row")
        kept.append(image.item.keep.clone())
    assert [int(keep.sum()) for keep in kept] == [4, 9]
    (held, _), *_ = cache.entries.values()
    assert held.item.keep is None and held.item.units[0].regions[0].chosen is None


def test_each_request_reads_the_saliency_its_method_reads():
    # One pass computed both saliencies (requests of both kinds): each request gets its own.
    standard, release = torch.rand(TOKENS), torch.rand(TOKENS)
    (encoded,) = Tower([pixels(0)])([0])
    encoded.item.saliency, encoded.release_saliency = standard, release
    assert encoded.for_selection(frozenset({"saliency"})).item.saliency is standard
    assert encoded.for_selection(frozenset({"release_saliency"})).item.saliency is release
    assert encoded.item.saliency is standard  # the entry itself is unchanged
    encoded.release_saliency = None  # a tower without a CLS row takes its own for both
    assert encoded.for_selection(frozenset({"release_saliency"})).item.saliency is standard


def test_requests_whose_methods_read_other_outputs_get_entries_of_their_own():
    tower = Tower([pixels(0)] * 3)  # one image, three requests
    cache = VisionCache(10 * ENTRY_BYTES)
    tensors, extras = tower.images, [None] * 3
    requires = [frozenset({"saliency"}), frozenset({"keys"}), frozenset({"saliency", "text"})]
    cache.encode(tensors, extras, requires, tower)
    assert tower.passes == [[0, 1]]  # the third reads what the first does
    cache.encode(tensors[:1], extras[:1], [frozenset({"keys", "text"})], tower)
    assert tower.passes == [[0, 1]] and cache.stats.entries == 2


def test_rows_copies_only_a_subset():
    values = torch.arange(6).view(3, 2)
    assert rows(values, [0, 1, 2]) is values
    assert rows(values, [0, 2]).tolist() == [[0, 1], [4, 5]]


def test_on_an_accelerator_the_first_call_holds_the_budget_for_vllms_profile():
    # vLLM sizes a GPU's KV cache from the peak of its profiling run, the first encoder call.
    cache = VisionCache(ENTRY_BYTES)
    accelerator = torch.device("meta")
    assert cache.hold_reserve(accelerator) is False  # nothing stored from the dummy images
    assert cache.reserve is not None and cache.reserve.numel() == ENTRY_BYTES
    assert cache.hold_reserve(accelerator) is True
    assert cache.reserve is None
    on_cpu = VisionCache(ENTRY_BYTES)
    assert on_cpu.hold_reserve(torch.device("cpu")) is True and on_cpu.reserve is None


@pytest.mark.parametrize(
    ("overrides", "lora", "capacity"),
    [
        ({}, False, 256 << 20),
        ({"vision_cache_mb": 0.5}, False, 1 << 19),
        ({"vision_cache_mb": 0}, False, 0),
        ({}, True, 0),
    ],
)
def test_the_model_sizes_its_cache_from_the_settings_and_turns_it_off_with_lora(overrides, lora, capacity):
    model = PrunedModelMixin()
    config = SimpleNamespace(lora_config=object() if lora else None)
    model.init_flashvlm(parse_settings({"budget": 8, **overrides}), vllm_config=config)
    assert model.flashvlm_vision.stats.capacity == capacity
    stock = PrunedModelMixin()
    stock.init_flashvlm(None, vllm_config=config)
    assert not stock.flashvlm_vision.enabled


def test_new_weights_empty_the_cache():
    class VllmModel:
        def load_weights(self, weights):
            return {name for name, _ in weights}

    class Model(PrunedModelMixin, VllmModel):
        pass

    model = Model()
    model.init_flashvlm(parse_settings({"budget": 8}))
    tower = Tower([pixels(0)])
    encode(model.flashvlm_vision, tower, [0])
    assert model.flashvlm_vision.stats.entries == 1
    assert model.load_weights([("tower.weight", torch.zeros(1))]) == {"tower.weight"}  # vLLM's result
    assert (model.flashvlm_vision.stats.entries, model.flashvlm_vision.stats.bytes) == (0, 0)
    encode(model.flashvlm_vision, tower, [0])
    assert tower.passes == [[0], [0]]
    assert clear_vision_cache(model) and model.flashvlm_vision.stats.entries == 0
    assert not clear_vision_cache(object())  # a stock model
