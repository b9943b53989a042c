"""Each peer method against a direct reading of its paper / release, on small tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families.llava import NUM_PATCHES, build_tiny_llava, llava_batch, tiny_llava_config
from families.shared import IMAGE_TOKEN_ID, left_pad, random_pixels, tiny_vision_config
from releases import released_divprune, released_visionzip
from transformers import LlavaForConditionalGeneration, SiglipVisionConfig

import flashvlm
from flashvlm.adapters import adapter_for
from flashvlm.errors import FlashVLMError, MethodUnavailableError
from flashvlm.selection import FlashVLM, SelectionInputs, get_method
from flashvlm.selection.baselines import cell_centres, pooled_grid
from flashvlm.selection.diversity import kmeans_diverse_subset
from flashvlm.selection.ops import dpp_greedy_map


def assert_k_unique(indices: torch.Tensor, batch: int, num_keep: int) -> None:
    assert indices.shape == (batch, num_keep)
    assert all(row.unique().numel() == num_keep for row in indices)


def random_inputs(batch=2, tokens=64, seed=0) -> SelectionInputs:
    generator = torch.Generator().manual_seed(seed)
    return SelectionInputs(
        features=torch.randn(batch, tokens, 16, generator=generator),
        saliency=torch.softmax(3 * torch.randn(batch, tokens, generator=generator), dim=-1),
        saliency_kind="cls",
        projected=torch.randn(batch, tokens, 24, generator=generator),
        text_embeds=torch.randn(batch, 5, 24, generator=generator),
        text_mask=torch.ones(batch, 5, dtype=torch.bool),
        keys=torch.randn(batch, tokens, 16, generator=generator),
        key_heads=4,
        text_before_image=torch.tensor([True, True, False, False, False]).expand(batch, -1),
        grid_shape=(8, 8) if tokens == 64 else None,
    )


# -- none, random, pool -------------------------------------------------------------------


def test_none_generates_exactly_what_the_stock_model_does(tiny_llava):
    inputs = llava_batch(tiny_llava, batch_size=3)
    with torch.no_grad():
        stock = tiny_llava.generate(**inputs, max_new_tokens=4, do_sample=False)
        with flashvlm.prune(tiny_llava, 1, "none") as pruner:
            kept_all = tiny_llava.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(stock, kept_all)
    assert all(image.num_kept == NUM_PATCHES for image in pruner.last.images)


def test_random_is_seeded_and_the_same_for_every_image():
    inputs = random_inputs(batch=3)
    first = get_method("random", seed=3)(inputs, 10).indices
    assert torch.equal(first, get_method("random", seed=3)(inputs, 10).indices)
    assert torch.equal(first[0], first[2])
    assert not torch.equal(first, get_method("random", seed=4)(inputs, 10).indices)
    with pytest.raises(FlashVLMError, match="seed must be an integer >= 0"):
        get_method("random", seed=-1)


@pytest.mark.parametrize(
    ("grid", "budget", "cells"),
    [
        ((24, 24), 192, (16, 12)),
        ((24, 24), 128, (8, 16)),
        ((24, 24), 64, (8, 8)),
        ((24, 24), 37, (7, 6)),
        ((8, 8), 7, (3, 3)),
    ],
)
def test_pooled_grid_is_the_nearest_grid_with_enough_cells(grid, budget, cells):
    assert pooled_grid(*grid, budget) == cells


@pytest.mark.parametrize("size", [3, 5, 8, 24])
def test_cell_centres_are_distinct_for_every_cell_count(size):
    for cells in range(1, size + 1):
        centres = cell_centres(size, cells)
        assert centres.unique().numel() == cells and int(centres.max()) < size


def test_pool_averages_each_cell_and_keeps_exactly_k():
    inputs = random_inputs()
    selection = get_method("pool")(inputs, 16)  # 8x8 -> 4x4 cells of 2x2 tokens
    grid = inputs.features.transpose(1, 2).reshape(2, 16, 8, 8)
    expected = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(selection.features, expected)
    assert selection.indices[0].tolist() == [row * 8 + col for row in (0, 2, 4, 6) for col in (0, 2, 4, 6)]
    for budget in (5, 7, 13, 37, 63):  # no exact grid: evenly spread cells of a larger one
        assert_k_unique(get_method("pool")(inputs, budget).indices, 2, budget)


def test_pool_without_a_grid_says_so():
    model = build_tiny_llava(vision_feature_select_strategy="full")  # CLS kept: 65 tokens, no grid
    input_ids, attention_mask = left_pad([[1, 5] + [IMAGE_TOKEN_ID] * (NUM_PATCHES + 1) + [6, 7]])
    with flashvlm.prune(model, 12, "pool"), torch.no_grad(), pytest.raises(MethodUnavailableError, match="grid"):
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=random_pixels(1))


# -- encoder-attention methods -------------------------------------------------------------


def test_visionzip_matches_the_released_steps():
    inputs = random_inputs()
    selection = get_method("visionzip")(inputs, 32)  # 27 dominant + 5 contextual
    for image in range(2):
        metric = inputs.keys[image].view(64, 4, -1).mean(1)  # the release's "metric": keys, mean over heads
        dominant, targets, tokens = released_visionzip(
            inputs.features[image], inputs.saliency[image], metric, num_dominant=27, num_contextual=5
        )
        indices = torch.cat([dominant, targets])
        order = indices.argsort()
        assert selection.indices[image].tolist() == indices[order].tolist()
        torch.testing.assert_close(selection.features[image], tokens[order])


def test_visionzip_contextual_token_is_target_plus_mean_of_members():
    # A contextual token is target + mean(members), as released, not the mean of all of them.
    features = torch.arange(6.0).view(6, 1).expand(6, 2).contiguous()
    keys = torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 4)
    inputs = SelectionInputs(
        features=features[None],
        saliency=torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]),  # token 5 dominant
        saliency_kind="cls",
        keys=keys[None],
        key_heads=1,
    )
    selection = get_method("visionzip", contextual_ratio=2 / 3)(inputs, 3)  # 1 dominant + 2 contextual
    # Remaining 0..4, step 2: targets 0 and 2; member 1 joins 0 (same key), members 3 and 4 join 2.
    assert selection.indices[0].tolist() == [0, 2, 5]
    assert selection.features[0, :, 0].tolist() == [0.0 + 1.0, 2.0 + 3.5, 5.0]


@pytest.mark.parametrize("method", ["visionzip", "vispruner"])
def test_received_variants_rank_by_any_saliency(method):
    inputs = random_inputs()
    inputs.saliency_kind = "received"
    with pytest.raises(MethodUnavailableError, match="no CLS"):
        get_method(method)(inputs, 20)
    received = get_method(f"{method}:received")
    assert "cls_attention" not in received.requires and "saliency" in received.requires
    assert "cls_attention" in get_method(method).requires  # the class's own set is untouched
    inputs.saliency_kind = "cls"
    expected = get_method(method)(inputs, 20)
    inputs.saliency_kind = "received"
    assert torch.equal(received(inputs, 20).indices, expected.indices)


def test_vispruner_is_flashvlm_without_text():
    inputs = random_inputs()
    vispruner = get_method("vispruner")(inputs, 20).indices
    assert torch.equal(vispruner, FlashVLM(text_weight=0.0)(inputs, 20).indices)


def test_cls_attention_methods_say_the_encoder_has_no_cls():
    vision = tiny_vision_config(SiglipVisionConfig, num_hidden_layers=3)
    torch.manual_seed(0)
    config = tiny_llava_config(vision_config=vision, vision_feature_select_strategy="full")
    model = LlavaForConditionalGeneration(config).eval()
    inputs = llava_batch(model, batch_size=1)
    for method in ("visionzip", "vispruner"):
        with flashvlm.prune(model, 12, method), torch.no_grad(), pytest.raises(MethodUnavailableError, match="no CLS"):
            model.generate(**inputs, max_new_tokens=1)
    with flashvlm.prune(model, 12, "flashvlm"), torch.no_grad():  # attention received stands in for CLS
        model.generate(**inputs, max_new_tokens=1)


# -- diversity methods ---------------------------------------------------------------------


def test_divprune_matches_the_released_loop():
    inputs = random_inputs()
    selection = get_method("divprune")(inputs, 20)
    for image in range(2):
        assert selection.indices[image].tolist() == released_divprune(inputs.projected[image], 20)
    assert get_method("divprune:linear")(inputs, 20).indices.shape == (2, 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_divprune_release_preset_keeps_the_release_tokens_in_the_model_dtype(dtype):
    inputs = random_inputs(tokens=96, seed=3)
    projected = inputs.projected.to(dtype)
    inputs.projected = projected
    selection = get_method("divprune:release")(inputs, 30)
    for image in range(2):
        assert selection.indices[image].tolist() == released_divprune(projected[image], 30)
    with pytest.raises(FlashVLMError, match="start must be 'isolated'"):
        get_method("divprune:release", start="farthest_from_mean")


def test_dpp_greedy_map_adds_the_largest_log_det_gain_each_step():
    generator = torch.Generator().manual_seed(0)
    unit = F.normalize(torch.randn(1, 20, 12, generator=generator), dim=-1)
    quality = torch.rand(1, 20, generator=generator) + 0.1
    kernel = quality[0, :, None] * (unit[0] @ unit[0].T) * quality[0, None, :]
    chosen: list[int] = []
    for _ in range(8):
        gains = [
            torch.logdet(kernel[chosen + [i]][:, chosen + [i]]) if i not in chosen else -torch.inf for i in range(20)
        ]
        chosen.append(int(torch.stack([torch.as_tensor(g) for g in gains]).argmax()))
    assert dpp_greedy_map(unit, quality, 8)[0].tolist() == chosen


def test_dpp_greedy_map_stays_finite_past_the_kernel_rank():
    unit = F.normalize(torch.randn(2, 30, 4), dim=-1)  # rank 4, 12 picks
    assert_k_unique(dpp_greedy_map(unit, torch.rand(2, 30) + 0.1, 12), 2, 12)


def test_cdpruner_relevance_sign_is_an_option():
    inputs = random_inputs()
    default, release_sign = get_method("cdpruner")(inputs, 16), get_method("cdpruner:release_sign")(inputs, 16)
    assert not torch.equal(default.indices, release_sign.indices)


def test_kmeans_diversity_copes_with_identical_tokens():
    unit = F.normalize(torch.ones(1, 10, 4), dim=-1)  # every token the same: clusters go empty
    candidates = torch.arange(10).flip(0)[None]
    picks = kmeans_diverse_subset(unit, candidates, 4)
    assert picks[0].unique().numel() == 4
    inputs = random_inputs()
    assert_k_unique(get_method("flashvlm:kmeans_diversity")(inputs, 20).indices, 2, 20)


# -- FastV --------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [1, 2])
def test_fastv_attention_equals_the_eager_attention_map(layer):
    inputs = llava_batch(None, batch_size=3)
    sdpa, eager = build_tiny_llava(), build_tiny_llava(attn_implementation="eager")
    adapter = adapter_for(sdpa)
    is_image = inputs["input_ids"] == IMAGE_TOKEN_ID
    with torch.no_grad():
        features, _, _ = adapter.encode_images(inputs["pixel_values"], -2, "default", need_qk=False)
        projected = sdpa.model.multi_modal_projector(features)  # (I, N, D)
        scores = adapter.visual_token_attention(
            inputs["input_ids"], inputs["attention_mask"], {IMAGE_TOKEN_ID: projected.flatten(0, 1)}, layer
        )[IMAGE_TOKEN_ID].view(-1, NUM_PATCHES)
        positions = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
        attentions = eager(**inputs, position_ids=positions, output_attentions=True).attentions
    expected = attentions[layer - 1][:, :, -1].mean(dim=1)[is_image].view(-1, NUM_PATCHES)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    attention = sdpa.model.language_model.layers[layer - 1].self_attn
    assert attention.config is sdpa.model.language_model.config  # the other layers never left SDPA


def test_fastv_layer_out_of_range_is_reported(tiny_llava):
    inputs = llava_batch(tiny_llava, batch_size=1)
    with flashvlm.prune(tiny_llava, 12, "fastv", layer=5), pytest.raises(FlashVLMError, match="has 2 layers"):
        tiny_llava.generate(**inputs, max_new_tokens=1)
    with pytest.raises(FlashVLMError, match="layer must be an integer >= 1"):
        get_method("fastv", layer=0)


def test_every_preset_of_every_method_selects_k_unique_tokens():
    from flashvlm.selection.base import _REGISTRY

    inputs = random_inputs()
    inputs.lm_attention = torch.softmax(torch.randn(2, 64), dim=-1)
    for name, method in _REGISTRY.items():
        for preset in method.presets:
            assert_k_unique(get_method(f"{name}:{preset}")(inputs, 20).indices, 2, 20)
