"""The ``flashvlm:release`` preset keeps exactly the tokens the authors' released LLaVA code keeps.

``released_llava_selection`` restates, operation by operation, the selection in the
release's ``encode_images`` (CaiKaitong/FlashVLM, llava/model/llava_arch.py): per-image
loop over text, norm gate after normalisation, soft max over text, softmax over
tokens, power, min-max, top-p suppression in float32, log fusion with CLS attention,
top half by score, then iterative bipartite removal on normalised CLIP features.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashvlm import SelectionInputs, get_method


def released_llava_selection(image_features, cls_attention, projected, text_embeds_per_image, budget, eta=0.5):
    """Kept indices (B, budget) as the release computes them. text_embeds_per_image: list of (L_b, D)."""
    features_normalized = F.normalize(image_features, dim=-1)
    batch, _ = image_features.shape[:2]
    num_important = int(budget * 0.5)
    num_diverse = budget - num_important
    image_lm = F.normalize(projected, dim=-1)
    relevance_rows = []
    for b in range(batch):
        text = F.normalize(text_embeds_per_image[b], dim=-1)
        norms = text.norm(dim=-1)
        text = text * (norms / (norms.max() + 1e-6)).unsqueeze(-1)
        sim_mat = image_lm[b] @ text.transpose(0, 1)
        weights = F.softmax(sim_mat / 0.05, dim=-1)
        sim = (sim_mat * weights).sum(dim=-1)
        sim = F.softmax(sim / 0.010, dim=0)
        sim = sim**2.5
        sim = (sim - sim.min()) / (sim.max() - sim.min() + 1e-6)
        sim = sim.float()
        threshold = torch.quantile(sim, 1 - 0.005)
        sim = torch.where(sim >= threshold, sim, sim * 0.1)
        sim = (sim - sim.min()) / (sim.max() - sim.min() + 1e-6)
        relevance_rows.append(sim)
    text_sim = torch.stack(relevance_rows)
    attention = (cls_attention - cls_attention.amin(-1, keepdim=True)) / (
        cls_attention.amax(-1, keepdim=True) - cls_attention.amin(-1, keepdim=True) + 1e-6
    )
    score = torch.exp((1 - eta) * torch.log(attention.clamp(min=1e-6)) + eta * torch.log(text_sim.clamp(min=1e-6)))
    score = (score - score.min(-1, keepdim=True).values) / (
        score.max(-1, keepdim=True).values - score.min(-1, keepdim=True).values + 1e-6
    )
    order = score.argsort(dim=-1, descending=True)
    important, residual = order[:, :num_important], order[:, num_important:]
    rows = torch.arange(batch).unsqueeze(-1)
    while True:
        tokens = features_normalized[rows, residual]
        r = min(8, tokens.shape[1] - num_diverse)
        if r <= 0:
            break
        a, b = tokens[..., ::2, :], tokens[..., 1::2, :]
        redundancy = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct = redundancy.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat([residual[..., ::2][rows, distinct], residual[..., 1::2]], dim=-1)
    return torch.sort(torch.cat([important, residual], dim=-1), dim=-1).values


def llava_like_inputs(seed: int, batch: int, text_lengths: list[int], dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    tokens, vision_width, lm_width = 576, 64, 48
    features = torch.randn(batch, tokens, vision_width, generator=generator)
    attention_logits = torch.randn(batch, 577, generator=generator) * 2
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
    expected = released_llava_selection(inputs.features, inputs.saliency, inputs.projected, text_per_image, budget)
    kept = get_method("flashvlm:release")(inputs, budget).indices
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("budget", [128, 32])
def test_release_preset_matches_the_release_in_half_precision(budget):
    inputs, text_per_image = llava_like_inputs(4, batch=2, text_lengths=[35, 35], dtype=torch.float16)
    expected = released_llava_selection(inputs.features, inputs.saliency, inputs.projected, text_per_image, budget)
    assert torch.equal(get_method("flashvlm:release")(inputs, budget).indices, expected)


def test_release_preset_with_different_text_lengths_per_image():
    inputs, text_per_image = llava_like_inputs(5, batch=3, text_lengths=[12, 40, 27])
    expected = released_llava_selection(inputs.features, inputs.saliency, inputs.projected, text_per_image, 64)
    assert torch.equal(get_method("flashvlm:release")(inputs, 64).indices, expected)


def test_default_agrees_with_release_up_to_ties_in_float32():
    # The default differs from the release by the (numerically negligible) norm gate and
    # by breaking exact ties by position; with ties broken the same way, both keep the
    # same tokens.
    inputs, _ = llava_like_inputs(9, batch=2, text_lengths=[30, 30])
    default = get_method("flashvlm", stable_ranking=False)(inputs, 64).indices
    assert torch.equal(default, get_method("flashvlm:release")(inputs, 64).indices)
