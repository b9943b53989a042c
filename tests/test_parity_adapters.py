"""Release parity end to end: ``flashvlm.prune`` on tiny fp16 / bf16 models keeps what the release would.

Each test records the :class:`SelectionInputs` the adapter hands the selector, runs the
restated release (tests/releases.py) on those same tensors in the model's dtype (the
release's attention maps leave the tower in that dtype), and compares the kept indices
the pruner reports with the release's, exactly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    IMAGE_TOKEN_ID,
    NUM_PATCHES,
    VIDEO_TOKEN_ID,
    build_tiny_llava,
    build_tiny_qwen2_5_vl,
    llava_batch,
    qwen_batch,
)
from releases import released_divprune, released_flashvlm_llava, released_flashvlm_qwen, released_vispruner

import flashvlm
from flashvlm.selection import DivPrune, FlashVLM, VisPruner

HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", params=HALF_DTYPES, ids=["fp16", "bf16"])
def half_llava(request):
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


@pytest.mark.parametrize("budget", [24, 9, 2])
def test_flashvlm_release_in_a_half_precision_llava_is_the_release(monkeypatch, half_llava, budget):
    inputs = llava_batch(half_llava, batch_size=3, seed=budget)
    inputs["pixel_values"] = inputs["pixel_values"].to(half_llava.dtype)
    kept, recorded = pruned_with_recorded_inputs(monkeypatch, half_llava, inputs, "flashvlm:release", budget, FlashVLM)
    (seen,) = recorded  # every image has 64 tokens: one batched selection
    dtype = half_llava.dtype
    assert seen.projected.dtype == seen.features.dtype == dtype
    texts = text_per_unit(half_llava, inputs, [IMAGE_TOKEN_ID])
    image_rows = [0, 1, 2, 2]  # the last row holds two images
    expected = released_flashvlm_llava(
        seen.features, seen.saliency.to(dtype), seen.projected, [texts[row] for row in image_rows], budget
    )
    assert torch.equal(torch.stack(kept), expected)


def released_vispruner_on(seen, budget):
    return released_vispruner(seen.features, seen.saliency.to(seen.features.dtype), budget)


def released_divprune_on(seen, budget):
    return torch.tensor([released_divprune(projected, budget) for projected in seen.projected])


@pytest.mark.parametrize(
    ("method", "selector_class", "release"),
    [("vispruner:release", VisPruner, released_vispruner_on), ("divprune:release", DivPrune, released_divprune_on)],
    ids=["vispruner", "divprune"],
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
