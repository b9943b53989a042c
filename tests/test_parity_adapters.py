"""Release parity end to end: ``flashvlm.prune`` on tiny LLaVA / Qwen2.5-VL models keeps what the release would.

For LLaVA the release's whole ``encode_images`` input is computed here from the model's own
weights, independently of the adapter: the stock tower's hidden states, the projector, and
the saliency as the release's tower computes it (transformers 4.37.2's eager CLIP attention
map, in the tower's dtype: ``releases.released_clip_cls_attention``). The restated release
(tests/releases.py) runs on those, and its kept indices must equal the pruner's exactly, in
float32, float16 and bfloat16. The other tests record the :class:`SelectionInputs` the
adapter hands the selector and run the restated release on those same tensors.
"""

from __future__ import annotations

import pytest
import torch
from families import EVERY_CASE, tiny_model
from families.llava import NUM_PATCHES, build_tiny_llava, llava_batch
from families.qwen_vl import build_tiny_qwen2_5_vl
from families.shared import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, qwen_batch
from releases import (
    released_clip_cls_attention,
    released_divprune,
    released_flashvlm_llava,
    released_flashvlm_qwen,
    released_vispruner,
)

import flashvlm
from flashvlm.selection import DivPrune, FlashVLM, VisPruner

HALF_DTYPES = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float32, *HALF_DTYPES]


@pytest.fixture(scope="module", params=HALF_DTYPES, ids=["fp16", "bf16"])
def half_llava(request):
    return build_tiny_llava().to(request.param)


@pytest.fixture(scope="module", params=ALL_DTYPES, ids=["fp32", "fp16", "bf16"])
def any_llava(request):
    return build_tiny_llava().to(request.param)


def pruned_with_recorded_inputs(monkeypatch, model, inputs, method, budget, selector_class):
    """Run ``method`` on ``inputs``; return the kept indices per unit and the SelectionInputs seen."""
    recorded = []
    original = selector_class.select

    def recording_select(self, selection_inputs, num_keep):
        recorded.append(selection_inputs)
        return original(self, selection_inputs, num_keep)

    monkeypatch.setattr(selector_class, "select", recording_select)
    with flashvlm.prune(model, budget, method) as pruner, torch.no_grad():
        model(**inputs)
    return [record.keep_indices for record in pruner.last.images], recorded


def text_per_unit(model, inputs, placeholder_ids):
    """Each batch row's prompt text embeddings (L_b, D), and the row of each visual unit in order."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    embeds = model.get_input_embeddings()
    is_text = mask & ~torch.isin(ids, torch.tensor(placeholder_ids))
    return [embeds(ids[row][is_text[row]]) for row in range(ids.shape[0])]


def released_llava_encoding(model, pixel_values):
    """What the LLaVA release's ``encode_images`` starts from, from the model's own weights and
    the stock tower (no flashvlm code): features (I, N, C) of the feature layer without CLS,
    their CLS attention (I, N) as the release's tower computes it, and the projected tokens."""
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers  # CLIPVisionModel or its transformer
    feature_layer = model.config.vision_feature_layer  # -2: hidden_states[-2], attentions[-2]
    with torch.no_grad():
        hidden_states = tower(pixel_values, output_hidden_states=True).hidden_states  # (layers + 1) x (I, S, C)
        layer_index = len(layers) + feature_layer  # the layer whose output is hidden_states[feature_layer]
        cls_attention = released_clip_cls_attention(layers[layer_index], hidden_states[layer_index])
        features = hidden_states[feature_layer][:, 1:]
        projected = model.model.multi_modal_projector(features)
    return features, cls_attention, projected


@pytest.mark.parametrize("budget", [32, 16, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flashvlm_release_in_a_llava_keeps_what_the_release_keeps(monkeypatch, any_llava, seed, budget):
    inputs = llava_batch(any_llava, batch_size=3, seed=seed)
    inputs["pixel_values"] = inputs["pixel_values"].to(any_llava.dtype)
    kept, (seen,) = pruned_with_recorded_inputs(monkeypatch, any_llava, inputs, "flashvlm:release", budget, FlashVLM)
    features, cls_attention, projected = released_llava_encoding(any_llava, inputs["pixel_values"])
    assert torch.equal(seen.features, features) and torch.equal(seen.projected, projected)
    # The saliency itself is the release's, bit for bit, in the tower's dtype.
    assert seen.saliency.dtype == any_llava.dtype and torch.equal(seen.saliency, cls_attention)
    texts = text_per_unit(any_llava, inputs, [IMAGE_TOKEN_ID])
    image_rows = [0, 1, 2, 2]  # the last row holds two images
    expected = released_flashvlm_llava(features, cls_attention, projected, [texts[row] for row in image_rows], budget)
    assert torch.equal(torch.stack(kept), expected)


@pytest.mark.parametrize("budget", [32, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vispruner_release_in_a_llava_keeps_what_the_release_keeps(monkeypatch, any_llava, seed, budget):
    inputs = llava_batch(any_llava, batch_size=2, seed=seed)
    inputs["pixel_values"] = inputs["pixel_values"].to(any_llava.dtype)
    kept, _ = pruned_with_recorded_inputs(monkeypatch, any_llava, inputs, "vispruner:release", budget, VisPruner)
    features, cls_attention, _ = released_llava_encoding(any_llava, inputs["pixel_values"])
    assert torch.equal(torch.stack(kept), released_vispruner(features, cls_attention, budget))


def released_divprune_on(seen, budget):
    return torch.tensor([released_divprune(projected, budget) for projected in seen.projected])


@pytest.mark.parametrize(
    ("method", "selector_class", "release"),
    [("divprune:release", DivPrune, released_divprune_on)],
    ids=["divprune"],
)
@pytest.mark.parametrize("budget", [24, 9])
def test_peer_release_presets_in_a_half_precision_llava_are_the_release(
    monkeypatch, half_llava, method, selector_class, release, budget
):
    inputs = llava_batch(half_llava, batch_size=2, seed=budget)
    inputs["pixel_values"] = inputs["pixel_values"].to(half_llava.dtype)
    kept, (seen,) = pruned_with_recorded_inputs(monkeypatch, half_llava, inputs, method, budget, selector_class)
    assert all(tokens.dtype == half_llava.dtype for tokens in (seen.features, seen.projected) if tokens is not None)
    assert torch.equal(torch.stack(kept), release(seen, budget))


def test_the_recorded_inputs_are_one_batch_of_all_images(monkeypatch, half_llava):
    inputs = llava_batch(half_llava, batch_size=3, seed=0)
    inputs["pixel_values"] = inputs["pixel_values"].to(half_llava.dtype)
    _, recorded = pruned_with_recorded_inputs(monkeypatch, half_llava, inputs, "flashvlm:release", 9, FlashVLM)
    assert [seen.features.shape[:2] for seen in recorded] == [(4, NUM_PATCHES)]


@pytest.fixture(scope="module")
def bf16_qwen():
    return build_tiny_qwen2_5_vl().to(torch.bfloat16)


@pytest.mark.parametrize("budget", [10, 5])
def test_flashvlm_release_qwen_in_a_bf16_qwen2_5_vl_is_the_release(monkeypatch, bf16_qwen, budget):
    # The release runs one image and one prompt: batch 1, the first image of qwen_batch's first row.
    inputs = qwen_batch(bf16_qwen, batch_size=1, seed=budget)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    ids = inputs["input_ids"][0]
    is_visual = torch.isin(ids, torch.tensor([IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]))
    is_text = inputs["attention_mask"][0].bool() & ~is_visual
    before_image = (is_visual.cumsum(0) == 0)[is_text]  # (L_text,) over the packed text
    kept, (seen,) = pruned_with_recorded_inputs(
        monkeypatch, bf16_qwen, inputs, "flashvlm:release_qwen", budget, FlashVLM
    )
    # The adapter says which packed text tokens precede the image, exactly as restated here.
    assert torch.equal(seen.text_before_image[0, : before_image.numel()], before_image)
    assert not seen.text_before_image[0, before_image.numel() :].any()
    prefix_text = bf16_qwen.get_input_embeddings()(ids[is_text][before_image])
    expected = released_flashvlm_qwen(seen.projected[0], seen.saliency[0].to(torch.bfloat16), prefix_text, budget)
    assert torch.equal(kept[0], expected)


@pytest.mark.parametrize("method", ["flashvlm:release", "vispruner:release"])
@pytest.mark.parametrize("case", EVERY_CASE, ids=[case.name for case in EVERY_CASE])
def test_the_release_presets_run_on_every_family_that_serves_them(case, method):
    # The release's saliency arithmetic where the adapter knows it (CLIP towers: LLaVA,
    # LLaVA-NeXT), the ordinary saliency elsewhere; a CLS-less family still refuses vispruner.
    model = tiny_model(case)
    inputs = case.make_inputs(model, batch_size=2, seed=3)
    budget = min(8, case.tokens_per_image - 1)
    if "cls_attention" in flashvlm.get_method(method).requires & case.lacks:
        with pytest.raises(flashvlm.errors.MethodUnavailableError), flashvlm.prune(model, budget, method):
            model(**inputs)
        return
    with flashvlm.prune(model, budget, method) as pruner, torch.no_grad():
        model(**inputs)
    assert all(unit.num_kept == budget for unit in pruner.last.images if unit.kind != "video")
