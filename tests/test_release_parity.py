"""The release presets keep exactly the tokens the authors' released code keeps, on hand-made tensors.

``releases.released_flashvlm_llava`` restates, operation by operation, the selection in
the release's ``encode_images`` (CaiKaitong/FlashVLM, llava/model/llava_arch.py): per-image
loop over text, norm gate after normalisation, soft max over text, softmax over
tokens, power, min-max, top-p suppression in float32, log fusion with CLS attention,
top half by score, then iterative bipartite removal on normalised CLIP features.
tests/test_parity_adapters.py checks the same end to end, through the adapters.
"""

from __future__ import annotations

import pytest
import torch
from releases import released_flashvlm_llava, released_flashvlm_qwen, released_vispruner

from flashvlm import SelectionInputs, get_method
from flashvlm.errors import MethodUnavailableError


def llava_like_inputs(seed: int, batch: int, text_lengths: list[int], dtype=torch.float32, tokens: int = 576):
    generator = torch.Generator().manual_seed(seed)
    vision_width, lm_width = 64, 48
    features = torch.randn(batch, tokens, vision_width, generator=generator)
    attention_logits = torch.randn(batch, tokens + 1, generator=generator) * 2
    cls_attention = torch.softmax(attention_logits, dim=-1)[:, 1:]  # post-softmax CLS row without CLS
    projection = torch.randn(vision_width, lm_width, generator=generator) / 8
    projected = features @ projection
    text = [torch.randn(length, lm_width, generator=generator) for length in text_lengths]
    width = max(text_lengths)
    text_embeds = torch.zeros(batch, width, lm_width)
    text_mask = torch.zeros(batch, width, dtype=torch.bool)
    for b, rows in enumerate(text):
        text_embeds[b, : len(rows)] = rows
        text_mask[b, : len(rows)] = True
    cast = lambda t: t.to(dtype)  # noqa: E731
    inputs = SelectionInputs(
        features=cast(features),
        saliency=cast(cls_attention),
        saliency_kind="cls",
        projected=cast(projected),
        text_embeds=cast(text_embeds),
        text_mask=text_mask,
    )
    return inputs, [cast(rows) for rows in text]


@pytest.mark.parametrize("budget", [192, 128, 64, 32, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_release_preset_keeps_the_same_tokens_as_the_release(seed, budget):
    inputs, text_per_image = llava_like_inputs(seed, batch=3, text_lengths=[40, 40, 40])
    expected = released_flashvlm_llava(inputs.features, inputs.saliency, inputs.projected, text_per_image, budget)
    kept = get_method("flashvlm:release")(inputs, budget).indices
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("budget", [128, 32])
def test_release_preset_matches_the_release_in_half_precision(budget):
    inputs, text_per_image = llava_like_inputs(4, batch=2, text_lengths=[35, 35], dtype=torch.float16)
    expected = released_flashvlm_llava(inputs.features, inputs.saliency, inputs.projected, text_per_image, budget)
    assert torch.equal(get_method("flashvlm:release")(inputs, budget).indices, expected)


def test_release_preset_with_different_text_lengths_per_image():
    inputs, text_per_image = llava_like_inputs(5, batch=3, text_lengths=[12, 40, 27])
    expected = released_flashvlm_llava(inputs.features, inputs.saliency, inputs.projected, text_per_image, 64)
    assert torch.equal(get_method("flashvlm:release")(inputs, 64).indices, expected)


def test_default_with_unstable_sorts_agrees_with_release_in_float32():
    # In float32 the default differs from the release by the norm gate (computed after
    # normalisation, lengths ~1) and by breaking exact ties by position. Exact ties are
    # common in the diversity step on real features (docs/methods.md measures how often
    # they change the kept set); with ties broken the same way, both keep the same tokens.
    inputs, _ = llava_like_inputs(9, batch=2, text_lengths=[30, 30])
    default = get_method("flashvlm", stable_ranking=False)(inputs, 64).indices
    assert torch.equal(default, get_method("flashvlm:release")(inputs, 64).indices)


def with_float32_saliency(inputs: SelectionInputs) -> SelectionInputs:
    """The adapters hand float32 saliency whatever the model's dtype: do the same here."""
    inputs.saliency = inputs.saliency.float()
    return inputs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_release_preset_casts_float32_saliency_to_the_model_dtype(dtype):
    inputs, text_per_image = llava_like_inputs(6, batch=2, text_lengths=[30, 22], dtype=dtype, tokens=144)
    expected = released_flashvlm_llava(inputs.features, inputs.saliency, inputs.projected, text_per_image, 32)
    kept = get_method("flashvlm:release")(with_float32_saliency(inputs), 32).indices
    assert torch.equal(kept, expected)


@pytest.mark.parametrize(("dtype", "budget"), [(torch.float32, 64), (torch.float16, 32), (torch.bfloat16, 16)])
def test_vispruner_release_preset_keeps_the_same_tokens_as_the_release(dtype, budget):
    inputs, _ = llava_like_inputs(7, batch=2, text_lengths=[5, 5], dtype=dtype, tokens=144)
    expected = released_vispruner(inputs.features, inputs.saliency, budget)
    kept = get_method("vispruner:release")(with_float32_saliency(inputs), budget).indices
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_release_qwen_preset_uses_only_the_text_before_the_image(dtype):
    inputs, text_per_image = llava_like_inputs(8, batch=1, text_lengths=[20], dtype=dtype, tokens=144)
    before_image = torch.zeros_like(inputs.text_mask)
    before_image[:, :7] = True  # the first 7 text tokens precede the image
    inputs.text_before_image = before_image
    expected = released_flashvlm_qwen(inputs.projected[0], inputs.saliency[0], text_per_image[0][:7], 24)
    kept = get_method("flashvlm:release_qwen")(with_float32_saliency(inputs), 24).indices
    assert torch.equal(kept[0], expected)


def test_release_qwen_preset_says_when_the_adapter_gives_no_text_positions():
    inputs, _ = llava_like_inputs(8, batch=1, text_lengths=[20])
    with pytest.raises(MethodUnavailableError, match="text_before_image"):
        get_method("flashvlm:release_qwen")(inputs, 48)
